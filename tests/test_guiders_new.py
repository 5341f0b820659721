"""The prediction-only guiders added for issue 12: parity with diffusers / ComfyUI / the papers, and properties.

Parity: diffusers' guiders are driven step by step on the same float32 inputs; ComfyUI's nodes
and the papers' formulas are re-derived here as independent float64 references (from the
formula, not from their code). Properties: scale 1 returns ``cond`` itself, finite inputs give
finite outputs in fp32/fp16/bf16, inputs are never modified, bad arguments raise naming them.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch
from diffusers.guiders import (
    AdaptiveProjectedMixGuidance,
    MagnitudeAwareGuidance,
    TangentialClassifierFreeGuidance,
)
from diffusers.utils import logging as diffusers_logging

from guidance import ops
from guidance.guiders import (
    APGMix,
    CFGNorm,
    FrequencyDecoupled,
    FreSca,
    IndependentCondition,
    MagnitudeAware,
    RenormCFG,
    SimilarityAdaptive,
    TangentialCFG,
    TimestepGuidance,
)
from guidance.schedules import Linear, Window

diffusers_logging.set_verbosity_error()


def _pair(shape=(2, 4, 8, 8), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(shape, generator=gen, dtype=torch.float64)
    uncond = 0.8 * cond + 0.4 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return cond.to(dtype), uncond.to(dtype)


def _drive(guider, steps, shape=(2, 4, 8, 8)):
    """diffusers' guider protocol, step by step: ``set_state``, ``prepare_inputs``, ``forward``."""
    outs = []
    for step in range(steps):
        cond, uncond = _pair(shape, seed=step)
        guider.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(999 - step))
        guider.prepare_inputs({"encoder_hidden_states": (cond[:, :1], uncond[:, :1])})
        outs.append(guider.forward(cond, uncond).pred)
    return outs


# ------------------------------------------------------------------------------------------ TCFG


def _tcfg_reference(cond, uncond, w):
    """TCFG from the paper's description: SVD of the per-sample 2 x D matrix [c; u] in float64."""
    c, u = cond.double().flatten(1), uncond.double().flatten(1)
    out = []
    for ci, ui in zip(c, u, strict=True):
        _, _, vh = torch.linalg.svd(torch.stack([ci, ui]), full_matrices=False)
        v1 = vh[0]
        damped = (ui @ v1) * v1
        out.append(damped + w * (ci - damped))
    return torch.stack(out).reshape(cond.shape)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 16, 8), (2, 5)])
def test_tcfg_matches_the_float64_svd_formula(shape):
    cond, uncond = _pair(shape, dtype=torch.float64)
    torch.testing.assert_close(ops.tcfg(cond, uncond, 5.0), _tcfg_reference(cond, uncond, 5.0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [3.0, 7.5])
def test_tcfg_matches_diffusers_tangential_guider(scale):
    ours = TangentialCFG(scale)
    reference = _drive(TangentialClassifierFreeGuidance(guidance_scale=scale), 3)
    for step, ref in enumerate(reference):
        cond, uncond = _pair(seed=step)
        # diffusers runs the SVD in float32; we use a float64 2 x 2 eigenproblem.
        torch.testing.assert_close(ours(cond, uncond, step=step), ref, rtol=1e-4, atol=1e-4 * scale)


def test_tcfg_original_formulation_is_our_scale_plus_one():
    reference = _drive(TangentialClassifierFreeGuidance(guidance_scale=4.0, use_original_formulation=True), 1)[0]
    cond, uncond = _pair(seed=0)
    torch.testing.assert_close(ops.tcfg(cond, uncond, 5.0), reference, rtol=1e-4, atol=5e-4)


def test_tcfg_equals_comfyui_node_on_denoised_predictions_of_an_eps_model():
    """ComfyUI projects x - D (= sigma eps here) and guides D; for eps models that is TCFG on eps."""
    eps_c, eps_u = _pair((1, 4, 8, 8), dtype=torch.float64)
    x, sigma, w = torch.randn(1, 4, 8, 8, dtype=torch.float64), 2.5, 6.0
    d_c, d_u = x - sigma * eps_c, x - sigma * eps_u
    # the node, from its description: score matrix [x - D_u; x - D_c], top singular vector v1
    s_u, s_c = (x - d_u).flatten(1), (x - d_c).flatten(1)
    _, _, vh = torch.linalg.svd(torch.cat([s_u, s_c]), full_matrices=False)
    d_u_damped = x - ((s_u @ vh[0]) * vh[0]).reshape(x.shape)
    comfy = d_u_damped + w * (d_c - d_u_damped)
    ours = x - sigma * ops.tcfg(eps_c, eps_u, w)
    torch.testing.assert_close(ours, comfy, rtol=1e-10, atol=1e-10)


def test_tcfg_leaves_parallel_uncond_alone_and_damps_orthogonal_parts():
    cond = torch.tensor([[3.0, 0.0, 0.0]])
    assert torch.allclose(ops.tangential_damping(cond, 0.5 * cond), 0.5 * cond)
    damped = ops.tangential_damping(cond, torch.tensor([[1.0, 1.0, 0.0]]))
    assert damped[0, 1].abs() < 1.0  # the part orthogonal to c shrinks


# ------------------------------------------------------------------------------------------ MAMBO-G


@pytest.mark.parametrize("alpha", [0.0, 2.0, 8.0])
def test_mambo_g_is_bit_identical_to_diffusers_magnitude_aware_guider(alpha):
    # diffusers' torch.norm over a list of dims works for (B, N, C) token sequences, not 4-D latents.
    shape = (2, 16, 8)
    reference = _drive(MagnitudeAwareGuidance(guidance_scale=10.0, alpha=alpha), 3, shape)
    ours = MagnitudeAware(10.0, alpha=alpha)
    for step, ref in enumerate(reference):
        cond, uncond = _pair(shape, seed=step)
        assert torch.equal(ours(cond, uncond, step=step), ref)


def test_mambo_g_formula_on_latents_and_its_original_formulation():
    cond, uncond = _pair(dtype=torch.float64)
    d = cond - uncond
    r = d.flatten(1).norm(dim=1) / uncond.flatten(1).norm(dim=1)
    w_eff = (1 + 6.0 * torch.exp(-8.0 * r)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ops.mambo_g(cond, uncond, 7.0), uncond + w_eff * d, rtol=1e-12, atol=1e-12)
    shape = (2, 16, 8)
    reference = _drive(MagnitudeAwareGuidance(guidance_scale=3.0, use_original_formulation=True), 1, shape)[0]
    cond, uncond = _pair(shape, seed=0)
    torch.testing.assert_close(ops.mambo_g(cond, uncond, 4.0), reference, rtol=1e-6, atol=1e-6)


def test_mambo_g_zero_uncond_gives_cond_not_nan():
    cond = torch.ones(2, 3)
    assert torch.equal(ops.mambo_g(cond, torch.zeros(2, 3), 5.0), cond)
    assert torch.equal(ops.mambo_g(torch.zeros(2, 3), torch.zeros(2, 3), 5.0), torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------ FDG


def test_laplacian_pyramid_collapses_back_and_has_the_expected_bands():
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    bands = ops.laplacian_pyramid(x, 3)
    assert [tuple(b.shape[-2:]) for b in bands] == [(16, 16), (8, 8), (4, 4)]
    torch.testing.assert_close(ops.collapse_pyramid(bands), x, rtol=1e-12, atol=1e-12)
    constant = torch.full((1, 1, 8, 8), 2.0, dtype=torch.float64)  # no detail: all energy in the low band
    low = ops.laplacian_pyramid(constant, 2)
    assert float(low[0].abs().max()) < 1e-12


def test_fdg_is_cfg_per_band():
    cond, uncond = _pair(dtype=torch.float64)
    scales = [9.0, 2.0]
    diff_bands = ops.laplacian_pyramid(cond - uncond, 2)
    expected = uncond + ops.collapse_pyramid([w * b for w, b in zip(scales, diff_bands, strict=True)])
    torch.testing.assert_close(ops.fdg(cond, uncond, scales), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ops.fdg(cond, uncond, [4.0, 4.0]), ops.cfg(cond, uncond, 4.0), rtol=1e-10, atol=1e-10)


def test_fdg_parallel_weight_damps_the_parallel_part_per_band():
    cond, uncond = _pair(dtype=torch.float64)
    c_bands, d_bands = ops.laplacian_pyramid(cond, 2), ops.laplacian_pyramid(cond - uncond, 2)
    u_bands = ops.laplacian_pyramid(uncond, 2)
    guided = []
    for c_k, d_k, u_k, w in zip(c_bands, d_bands, u_bands, (6.0, 3.0), strict=True):
        unit = c_k.flatten(1) / c_k.flatten(1).norm(dim=1, keepdim=True)
        par = ((d_k.flatten(1) * unit).sum(1, keepdim=True) * unit).reshape(d_k.shape)
        guided.append(u_k + w * (0.3 * par + (d_k - par)))
    torch.testing.assert_close(
        ops.fdg(cond, uncond, [6.0, 3.0], parallel_weights=0.3), ops.collapse_pyramid(guided), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("parallel_weights", [None, 0.5])
@pytest.mark.parametrize("shape,scales", [((2, 4, 16, 16), [10.0, 5.0]), ((1, 4, 32, 32), [8.0, 4.0, 2.0])])
def test_fdg_is_bit_identical_to_diffusers_frequency_decoupled_guider(shape, scales, parallel_weights):
    pytest.importorskip("kornia")  # diffusers' FDG needs kornia's pyramid
    from diffusers.guiders import FrequencyDecoupledGuidance

    weights = None if parallel_weights is None else [parallel_weights] * len(scales)
    reference = _drive(FrequencyDecoupledGuidance(guidance_scales=scales, parallel_weights=weights), 2, shape)
    ours = FrequencyDecoupled(scales, parallel_weights=parallel_weights)
    for step, ref in enumerate(reference):
        cond, uncond = _pair(shape, seed=step)
        assert torch.equal(ours(cond, uncond, step=step), ref)


def test_fdg_pads_sides_that_do_not_halve_and_crops_back():
    cond, uncond = _pair((1, 2, 12, 10))
    out = ops.fdg(cond, uncond, [5.0, 3.0, 2.0])
    assert out.shape == cond.shape and bool(torch.isfinite(out).all())
    video = _pair((1, 2, 3, 8, 8))
    assert ops.fdg(*video, [5.0, 2.0]).shape == (1, 2, 3, 8, 8)


def test_fdg_guider_per_level_schedules_and_off_steps():
    guider = FrequencyDecoupled((Window(6.0, start_step=1), 1.0))
    assert not guider.needs_uncond(step=0, num_steps=3) and guider.needs_uncond(step=1, num_steps=3)
    cond, uncond = _pair()
    assert guider(cond, None, step=0, num_steps=3) is cond
    torch.testing.assert_close(guider(cond, uncond, step=1, num_steps=3), ops.fdg(cond, uncond, [6.0, 1.0]))


# ------------------------------------------------------------------------------------------ APG mix


@pytest.mark.parametrize("momentum", [-0.5, None])
def test_apg_mix_is_bit_identical_to_diffusers_adaptive_projected_mix(momentum):
    steps = 9
    reference = AdaptiveProjectedMixGuidance(
        guidance_scale=3.5,
        adaptive_projected_guidance_scale=8.0,
        adaptive_projected_guidance_momentum=momentum,
        adaptive_projected_guidance_rescale=4.0,
        adaptive_projected_guidance_start_step=3,
    )
    ours = APGMix(3.5, apg_scale=8.0, momentum=momentum, norm_threshold=4.0, apg_start_step=3)
    for _run in range(2):  # the momentum restarts with every run
        expected = _drive(reference, steps)
        ours.reset()
        for step, ref in enumerate(expected):
            cond, uncond = _pair(seed=step)
            assert torch.equal(ours(cond, uncond, step=step, num_steps=steps), ref), step


def test_apg_mix_uses_cfg_until_the_start_step_and_when_apg_scale_is_one():
    cond, uncond = _pair()
    mix = APGMix(3.0, apg_scale=1.0, apg_start_step=0)
    assert torch.equal(mix(cond, uncond, step=4), ops.cfg(cond, uncond, 3.0))
    mix = APGMix(3.0, apg_scale=6.0, momentum=None, norm_threshold=None, apg_start_step=1, convention="paper")
    assert torch.equal(mix(cond, uncond, step=1), ops.cfg(cond, uncond, 3.0))
    assert torch.equal(mix(cond, uncond, step=2), ops.apg(cond, uncond, 6.0, convention="paper"))


# ------------------------------------------------------------------------------------------ ComfyUI nodes


def _comfy_cfg_norm(c, u, w, strength):
    g = u + w * (c - u)
    k = (c.norm(dim=1, keepdim=True) / (g.norm(dim=1, keepdim=True) + 1e-8)).clamp(0, 1)
    return g * k * strength


@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_cfg_norm_matches_comfyui_node(strength):
    cond, uncond = _pair(dtype=torch.float64)
    torch.testing.assert_close(
        ops.cfg_norm(cond, uncond, 6.0, strength=strength), _comfy_cfg_norm(cond, uncond, 6.0, strength), rtol=1e-12, atol=1e-12
    )
    cond32, uncond32 = _pair()
    torch.testing.assert_close(
        CFGNorm(6.0, strength, space="prediction")(cond32, uncond32, step=0),
        _comfy_cfg_norm(cond32.double(), uncond32.double(), 6.0, strength).float(),
        rtol=1e-5,
        atol=1e-5,
    )


def _comfy_mahiro(c, u, w):
    def signed_sqrt(x):
        return x.abs().sqrt() * x.sign()

    leap, u_leap = w * c, w * u
    g = u + w * (c - u)
    merge = (leap + g) / 2
    sim = torch.nn.functional.cosine_similarity(signed_sqrt(u_leap), signed_sqrt(merge), dim=1).mean()
    k = 2 * (sim + 1)
    return (k * g + (4 - k) * leap) / 4


def test_mahiro_comfyui_convention_matches_the_node_and_per_sample_for_batch_one():
    cond, uncond = _pair(dtype=torch.float64)
    expected = _comfy_mahiro(cond, uncond, 5.0)
    torch.testing.assert_close(ops.mahiro(cond, uncond, 5.0, convention="comfyui"), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.mahiro(cond[:1], uncond[:1], 5.0), _comfy_mahiro(cond[:1], uncond[:1], 5.0))
    per_sample = ops.mahiro(cond, uncond, 5.0)
    for i in range(2):  # each sample depends on itself only
        torch.testing.assert_close(per_sample[i : i + 1], _comfy_mahiro(cond[i : i + 1], uncond[i : i + 1], 5.0))


def _comfy_fresca(c, u, w, low, high, cutoff):
    d = c - u
    spectrum = torch.fft.fftshift(torch.fft.fftn(d, dim=(-2, -1)), dim=(-2, -1))
    h, wd = d.shape[-2:]
    mask = torch.full_like(d, high)
    mask[..., h // 2 - cutoff : h // 2 + cutoff, wd // 2 - cutoff : wd // 2 + cutoff] = low
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return u + w * filtered


@pytest.mark.parametrize("cutoff", [2, 4, 6])
def test_fresca_matches_comfyui_node(cutoff):
    cond, uncond = _pair((2, 4, 8, 8), dtype=torch.float64)
    expected = _comfy_fresca(cond, uncond, 4.0, 0.9, 1.3, cutoff)
    comfy = ops.fresca(cond, uncond, 4.0, scale_low=0.9, scale_high=1.3, freq_cutoff=cutoff, convention="comfyui")
    torch.testing.assert_close(comfy, expected, rtol=1e-12, atol=1e-12)
    clamped = ops.fresca(cond, uncond, 4.0, scale_low=0.9, scale_high=1.3, freq_cutoff=cutoff)
    if cutoff <= 4:  # the conventions agree while the box fits (half the side)
        torch.testing.assert_close(clamped, expected, rtol=1e-12, atol=1e-12)
    else:  # ComfyUI's slice start wraps around; ours clips: every frequency is low
        torch.testing.assert_close(clamped, ops.cfg(cond, uncond, 4.0 * 0.9), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(comfy, clamped)


def test_fresca_low_frequencies_get_scale_low():
    x = torch.ones(1, 1, 8, 8)  # only the zero frequency
    torch.testing.assert_close(ops.frequency_scale(x, 0.5, 3.0, 1), 0.5 * x)


def _lumina_renorm(c, u, w, rho):
    """Lumina-Image 2.0's forward_with_cfg, one sample at a time (its `if` works for batch 1 only)."""
    out = []
    for ci, ui in zip(c, u, strict=True):
        g = ui + w * (ci - ui)
        if rho > 0:
            max_norm = ci.norm() * rho
            if g.norm() >= max_norm:
                g = g * (max_norm / g.norm())
        out.append(g)
    return torch.stack(out)


@pytest.mark.parametrize("rho", [0.0, 1.0, 1.5, 100.0])
def test_renorm_matches_lumina_formula(rho):
    cond, uncond = _pair(dtype=torch.float64)
    torch.testing.assert_close(ops.cfg_renorm(cond, uncond, 6.0, rho=rho), _lumina_renorm(cond, uncond, 6.0, rho), rtol=1e-12, atol=1e-12)


def test_renorm_diffusers_convention_matches_lumina2_pipeline():
    cond, uncond = _pair((2, 16, 8))
    g = uncond + 4.0 * (cond - uncond)
    expected = g * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(g, dim=-1, keepdim=True))
    torch.testing.assert_close(ops.cfg_renorm(cond, uncond, 4.0, convention="diffusers"), expected)


def test_renorm_trunc_stops_guidance_like_lumina2_cfg_trunc_ratio():
    guider = RenormCFG(4.0, trunc=0.5)
    # Lumina2Pipeline: truncated when (i + 1) / N > cfg_trunc_ratio
    assert [guider.needs_uncond(i, 6) for i in range(6)] == [(i + 1) / 6 <= 0.5 for i in range(6)]
    cond, _ = _pair()
    assert guider(cond, None, step=5, num_steps=6) is cond
    with pytest.raises(ValueError, match="num_steps"):
        guider.needs_uncond(0)


# ------------------------------------------------------------------------------------------ ICG / TSG


def test_icg_and_tsg_combine_with_their_reference_branch_not_uncond():
    cond, other = _pair()
    icg, tsg = IndependentCondition(3.0, num_classes=10), TimestepGuidance(4.0)
    assert not icg.needs_uncond(0) and icg.needs_reference(0)
    assert torch.equal(icg(cond, None, step=0, independent=other), ops.cfg(cond, other, 3.0))
    assert torch.equal(tsg(cond, None, step=0, perturbed_time=other), ops.cfg(cond, other, 4.0))
    with pytest.raises(ValueError, match="independent="):
        icg(cond, other, step=0)  # the pipeline's uncond is not the reference
    assert TimestepGuidance(1.0)(cond, None, step=0) is cond


def test_random_condition_draws_are_seeded_and_leave_the_global_rng_alone():
    labels = torch.zeros(64, dtype=torch.long)
    state = torch.get_rng_state()
    a = ops.random_labels_like(labels, 10, generator=torch.Generator().manual_seed(1))
    b = ops.random_labels_like(labels, 10, generator=torch.Generator().manual_seed(1))
    e = 2.0 * torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(0))
    r = ops.random_embedding_like(e, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and 0 <= int(a.min()) and int(a.max()) <= 9 and len(a.unique()) > 5
    assert abs(float(r.std()) - float(e.std())) < 0.1 and abs(float((r * e).mean())) < 0.1


def test_perturb_time_embedding_formula():
    e = torch.randn(3, 16, dtype=torch.float64)
    n = torch.randn(3, 16, dtype=torch.float64)
    t = torch.tensor([1000.0, 500.0, 0.0], dtype=torch.float64)
    expected = e + 3.0 * (t / 1000).pow(0.25).unsqueeze(1) * e.std(dim=1, keepdim=True) * n
    torch.testing.assert_close(ops.perturb_time_embedding(e, t, noise=n), expected, rtol=1e-12, atol=1e-12)
    plain = e + 2.0 * (t / 1000).pow(0.5).unsqueeze(1) * n
    out = ops.perturb_time_embedding(e, t, noise=n, noise_scale=2.0, power=0.5, scale_by_std=False)
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ properties

GUIDERS = {
    "tcfg": lambda w: TangentialCFG(w),
    "fdg": lambda w: FrequencyDecoupled((w, max(1.5, w / 2))),
    "mambo_g": lambda w: MagnitudeAware(w),
    "apg_mix": lambda w: APGMix(w, apg_scale=w, apg_start_step=0),
    "cfg_norm": lambda w: CFGNorm(w, space="prediction"),
    "renorm": lambda w: RenormCFG(w),
    "mahiro": lambda w: SimilarityAdaptive(w, space="prediction"),
    "fresca": lambda w: FreSca(w, freq_cutoff=2),
}


@pytest.mark.parametrize("name", list(GUIDERS))
def test_scale_one_returns_cond_itself_and_uncond_may_be_none(name):
    cond, uncond = _pair()
    guider = GUIDERS[name](1.0) if name != "fdg" else FrequencyDecoupled((1.0, 1.0))
    assert not guider.needs_uncond(0, 4)
    assert guider(cond, uncond, step=0, num_steps=4) is cond
    assert guider(cond, None, step=1, num_steps=4) is cond


@pytest.mark.parametrize("name", list(GUIDERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_in_finite_out_without_modifying_inputs(name, dtype):
    cond, uncond = _pair(dtype=dtype)
    cond_copy, uncond_copy = cond.clone(), uncond.clone()
    guider = GUIDERS[name](7.5)
    for step in range(3):
        out = guider(cond, uncond, step=step, num_steps=3)
        assert out.dtype == dtype and out.shape == cond.shape
        assert bool(torch.isfinite(out).all()), (name, dtype, step)
    assert torch.equal(cond, cond_copy) and torch.equal(uncond, uncond_copy)
    zeros = torch.zeros_like(cond)
    assert bool(torch.isfinite(GUIDERS[name](7.5)(zeros, zeros, step=0, num_steps=3)).all())


@pytest.mark.parametrize("name", list(GUIDERS))
def test_guided_output_differs_from_cond_and_follows_schedules(name):
    cond, uncond = _pair()
    guider = GUIDERS[name](Linear(1.0, 6.0)) if name != "fdg" else FrequencyDecoupled((Linear(1.0, 6.0), 1.0))
    assert guider(cond, uncond, step=0, num_steps=3) is cond
    assert not torch.allclose(guider(cond, uncond, step=2, num_steps=3), cond)


@pytest.mark.parametrize(
    "make,argument,error",
    [
        (lambda: MagnitudeAware(5.0, alpha=-1.0), "alpha", ValueError),
        (lambda: MagnitudeAware(5.0, alpha="x"), "alpha", TypeError),
        (lambda: FrequencyDecoupled(()), "scales", ValueError),
        (lambda: FrequencyDecoupled((5.0, 2.0), parallel_weights=[0.5, 0.5, 0.5]), "parallel_weights", ValueError),
        (lambda: FrequencyDecoupled((5.0, float("nan"))), "scale", ValueError),
        (lambda: APGMix(3.0, convention="mine"), "convention", ValueError),
        (lambda: APGMix(3.0, norm_threshold=-1.0), "norm_threshold", ValueError),
        (lambda: APGMix(3.0, apg_start_step=1.5), "apg_start_step", TypeError),
        (lambda: APGMix(3.0, momentum=2.0), "momentum", ValueError),
        (lambda: CFGNorm(3.0, strength=-1.0), "strength", ValueError),
        (lambda: CFGNorm(3.0, space="eps"), "space", ValueError),
        (lambda: RenormCFG(3.0, renorm=-1.0), "renorm", ValueError),
        (lambda: RenormCFG(3.0, trunc=1.5), "trunc", ValueError),
        (lambda: RenormCFG(3.0, renorm=0.0, convention="diffusers"), "renorm", ValueError),
        (lambda: SimilarityAdaptive(3.0, convention="batch"), "convention", ValueError),
        (lambda: FreSca(3.0, freq_cutoff=-1), "freq_cutoff", ValueError),
        (lambda: FreSca(3.0, freq_cutoff=2.5), "freq_cutoff", TypeError),
        (lambda: FreSca(3.0, scale_high=float("inf")), "scale_high", ValueError),
        (lambda: FreSca(3.0, convention="wrap"), "convention", ValueError),
        (lambda: IndependentCondition(3.0, num_classes=0), "num_classes", ValueError),
        (lambda: TimestepGuidance(3.0, noise_scale=-1.0), "noise_scale", ValueError),
        (lambda: TimestepGuidance(3.0, time_scale=0.0), "time_scale", ValueError),
        (lambda: TangentialCFG(3.0, rescale=2.0), "rescale", ValueError),
        (lambda: ops.tcfg(torch.ones(2, 3), torch.ones(2, 4), 2.0), "uncond", ValueError),
        (lambda: ops.fdg(torch.ones(2, 3), torch.ones(2, 3), [2.0]), "cond", ValueError),
        (lambda: ops.laplacian_pyramid(torch.ones(1, 1, 6, 6), 3), "divisible", ValueError),
        (lambda: ops.laplacian_pyramid(torch.ones(1, 1, 8, 8), 0), "levels", ValueError),
        (lambda: ops.cfg_norm(torch.ones(2, 3), torch.ones(2, 3), 2.0, dim=5), "dim", ValueError),
        (lambda: ops.mahiro(torch.ones(3), torch.ones(3), 2.0), "cond", ValueError),
        (lambda: ops.random_labels_like(torch.zeros(2), 0), "num_classes", ValueError),
        (lambda: ops.perturb_time_embedding(torch.ones(2, 3), torch.ones(3)), "timestep", ValueError),
        (lambda: ops.perturb_time_embedding(torch.ones(2, 3), 1.0, noise=torch.ones(3)), "noise", ValueError),
        (lambda: ops.perturb_time_embedding([1.0, 2.0], 1.0), "embedding", TypeError),
        (lambda: ops.perturb_time_embedding(torch.ones(2, 3), 1.0, noise=[1.0]), "noise", TypeError),
        (lambda: ops.perturb_time_embedding(torch.ones(2, 3), 1.0, scale_by_std=1), "scale_by_std", TypeError),
        (lambda: ops.random_embedding_like(torch.ones(2, 3, dtype=torch.long)), "embeds", TypeError),
        (lambda: ops.random_embedding_like(torch.ones(2, 3), match_std="yes"), "match_std", TypeError),
        (lambda: ops.random_labels_like([0, 1], 10), "labels", TypeError),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make, argument, error):
    with pytest.raises(error, match=argument):
        make()


def test_tensor_scales_guide_each_sample():
    cond, uncond = _pair()
    scales = torch.tensor([1.0, 4.0])
    for fn in (ops.tcfg, ops.mambo_g, ops.cfg_renorm, ops.mahiro, ops.fresca):
        out = fn(cond, uncond, scales)
        assert torch.equal(out[0], cond[0]), fn.__name__
        torch.testing.assert_close(out[1:], fn(cond[1:], uncond[1:], 4.0), rtol=1e-5, atol=1e-5)


def test_repr_names_the_configuration():
    assert "alpha=8.0" in repr(MagnitudeAware())
    assert "apg_start_step=5" in repr(APGMix())
    assert "freq_cutoff=20" in repr(FreSca())
    assert math.isclose(FrequencyDecoupled().level_scales(0)[1], 5.0)


# ------------------------------------------------------------------------------------------ modular components


def _drive_ours_and_reference(ours, reference, steps=4, shape=(2, 4, 8, 8)):
    for run in range(2):
        mine, theirs = _drive(ours, steps, shape), _drive(reference, steps, shape)
        yield run, mine, theirs


def test_modular_components_match_diffusers_guiders():
    from guidance.diffusion.modular_more import APGMixGuidance, MAMBOGuidance, TCFGGuidance

    pairs = [
        (TCFGGuidance(guidance_scale=5.0), TangentialClassifierFreeGuidance(guidance_scale=5.0), (2, 4, 8, 8), 1e-4),
        (MAMBOGuidance(guidance_scale=6.0, alpha=4.0), MagnitudeAwareGuidance(guidance_scale=6.0, alpha=4.0), (2, 8, 4), 0.0),
        (
            APGMixGuidance(guidance_scale=3.0, apg_scale=6.0, apg_start_step=1),
            AdaptiveProjectedMixGuidance(
                guidance_scale=3.0, adaptive_projected_guidance_scale=6.0, adaptive_projected_guidance_start_step=1
            ),
            (2, 4, 8, 8),
            0.0,
        ),
    ]
    for ours, reference, shape, tol in pairs:
        for _run, mine, theirs in _drive_ours_and_reference(ours, reference, shape=shape):
            for a, b in zip(mine, theirs, strict=True):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_fdg_component_matches_diffusers_when_kornia_is_installed():
    pytest.importorskip("kornia")
    from diffusers.guiders import FrequencyDecoupledGuidance

    from guidance.diffusion.modular_more import FDGGuidance

    for _run, mine, theirs in _drive_ours_and_reference(
        FDGGuidance(guidance_scales=[8.0, 3.0], parallel_weights=0.5),
        FrequencyDecoupledGuidance(guidance_scales=[8.0, 3.0], parallel_weights=[0.5, 0.5]),
    ):
        for a, b in zip(mine, theirs, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "component,guider",
    [
        ("CFGNormGuidance", lambda: CFGNorm(4.0, 0.9, space="prediction")),
        ("RenormCFGGuidance", lambda: RenormCFG(4.0, 1.2)),
        ("MahiroGuidance", lambda: SimilarityAdaptive(4.0, space="prediction")),
        ("FreScaGuidance", lambda: FreSca(4.0, 0.8, 1.5, 2)),
        ("FDGGuidance", lambda: FrequencyDecoupled((4.0, 2.0))),
    ],
)
def test_modular_components_equal_their_guider_and_round_trip(component, guider, tmp_path):
    from guidance.diffusion import modular_more as modular

    kwargs = {
        "CFGNormGuidance": {"guidance_scale": 4.0, "strength": 0.9},
        "RenormCFGGuidance": {"guidance_scale": 4.0, "renorm": 1.2},
        "MahiroGuidance": {"guidance_scale": 4.0},
        "FreScaGuidance": {"guidance_scale": 4.0, "scale_low": 0.8, "scale_high": 1.5, "freq_cutoff": 2},
        "FDGGuidance": {"guidance_scales": [4.0, 2.0]},
    }[component]
    cls = getattr(modular, component)
    ours = cls(**kwargs)
    ours.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    reference = guider()
    for step, (a, b) in enumerate(zip(_drive(ours, 3), _drive(loaded, 3), strict=True)):
        cond, uncond = _pair(seed=step)
        assert torch.equal(a, b)
        assert torch.equal(a, reference(cond, uncond, step=step, num_steps=3))
    off = cls(**{**kwargs, **({"guidance_scales": [1.0, 1.0]} if component == "FDGGuidance" else {"guidance_scale": 1.0})})
    off.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(999))
    assert off.num_conditions == 1


def test_renorm_component_trunc_skips_the_unconditional_batch():
    from guidance.diffusion.modular_more import RenormCFGGuidance

    guider = RenormCFGGuidance(guidance_scale=4.0, trunc=0.5)
    counts = []
    for step in range(4):
        guider.set_state(step=step, num_inference_steps=4, timestep=torch.tensor(999 - step))
        counts.append(guider.num_conditions)
    assert counts == [2, 2, 1, 1]


# ------------------------------------------------------------------------------------------ attach


@pytest.fixture(scope="module")
def tiny_sd():
    from guidance.diffusion.testing import tiny_stable_diffusion

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_stable_diffusion()
    torch.set_num_threads(threads)


def _sd_run(pipe, **kwargs):
    kwargs.setdefault("negative_prompt", ["blur", "ugly"])
    return pipe(
        ["a cat", "dog"],
        num_images_per_prompt=2,
        num_inference_steps=3,
        height=16,
        width=16,
        output_type="latent",
        generator=[torch.Generator().manual_seed(i) for i in range(4)],
        **kwargs,
    ).images


ATTACH_GUIDERS = {
    "tcfg": lambda w: TangentialCFG(w),
    "fdg": lambda w: FrequencyDecoupled((w, w)),
    "mambo_g": lambda w: MagnitudeAware(w),
    "apg_mix": lambda w: APGMix(w, apg_scale=w, apg_start_step=0),
    "cfg_norm": lambda w: CFGNorm(w),  # x0 space through the scheduler's noise level
    "renorm": lambda w: RenormCFG(w, renorm=1.0),
    "mahiro": lambda w: SimilarityAdaptive(w),
    "fresca": lambda w: FreSca(w, freq_cutoff=1),
}


@pytest.mark.parametrize("name", list(ATTACH_GUIDERS))
def test_attach_scale_one_is_the_plain_pipeline_and_guidance_changes_it(tiny_sd, name):
    from guidance.diffusion import attach

    plain = _sd_run(tiny_sd, guidance_scale=1.0, negative_prompt=None)
    with attach(tiny_sd, ATTACH_GUIDERS[name](1.0)) as handle:
        off = _sd_run(tiny_sd, guidance_scale=3.0)
    assert torch.equal(off, plain) and handle.stats.uncond_rows == 0
    cfg = _sd_run(tiny_sd, guidance_scale=4.0)
    with attach(tiny_sd, ATTACH_GUIDERS[name](4.0)) as handle:
        guided = _sd_run(tiny_sd, guidance_scale=2.0)
    assert bool(torch.isfinite(guided).all()) and handle.stats.evaluations == 2 * 4 * 3
    assert not torch.equal(guided, plain)
    if name != "fdg":  # FDG with equal band scales is CFG up to rounding
        assert not torch.allclose(guided, cfg, atol=1e-6)


def test_attach_fdg_with_equal_band_scales_is_cfg(tiny_sd):
    from guidance.diffusion import attach

    cfg = _sd_run(tiny_sd, guidance_scale=4.0)
    with attach(tiny_sd, FrequencyDecoupled((4.0, 4.0))):
        torch.testing.assert_close(_sd_run(tiny_sd, guidance_scale=2.0), cfg, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tcfg", "mahiro", "fresca"])
def test_attach_on_the_digits_pipeline(name):
    from guidance.diffusion import attach
    from guidance.models import load_digits_pipeline

    pipe = load_digits_pipeline("ddim")

    def sample(scale):
        return pipe([3, 7], num_images_per_prompt=2, guidance_scale=scale, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    plain = sample(1.0)
    with attach(pipe, ATTACH_GUIDERS[name](1.0)):
        assert torch.equal(sample(2.0), plain)
    with attach(pipe, ATTACH_GUIDERS[name](3.0)) as handle:
        guided = sample(2.0)
    assert bool(torch.isfinite(guided).all()) and not torch.equal(guided, plain)
    assert handle.stats.evaluations_per_image == 8


# ------------------------------------------------------------------------------------------ ICG / TSG hooks


def test_random_condition_hook_on_the_digits_unet_changes_only_its_rows():
    from guidance.models import load_digits_pipeline
    from guidance.perturbations.condition import RandomCondition

    unet = load_digits_pipeline().unet
    x, labels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 3, 7, 7])
    plain = unet(x, 500, class_labels=labels).sample
    hook = RandomCondition(num_classes=10, seed=3)
    with hook.apply(unet, slice(0, 2)):
        first = unet(x, 500, class_labels=labels).sample
    assert torch.equal(first[2:], plain[2:]) and not torch.equal(first[:2], plain[:2])
    hook.reset()
    with hook.apply(unet, slice(0, 2)):
        again = unet(x, 500, class_labels=labels).sample
    assert torch.equal(again, first)  # seeded: reset restarts the stream
    # the reference equals the model under the drawn labels
    drawn = ops.random_labels_like(labels[:2], 10, generator=torch.Generator().manual_seed(3))
    direct = unet(x[:2], 500, class_labels=drawn).sample
    torch.testing.assert_close(first[:2], direct, rtol=1e-5, atol=1e-5)
    assert not unet.class_embedding._forward_pre_hooks  # removed on exit
    with pytest.raises(RuntimeError), hook.apply(unet, None):
        unet(x, 500, class_labels=labels[:1].float())  # the forward fails inside: hooks still removed
    assert not unet.class_embedding._forward_pre_hooks


def test_random_condition_hook_on_text_cross_attention_and_perturbed_timestep(tiny_sd):
    from guidance.perturbations.condition import PerturbedTimestep, RandomCondition

    unet = tiny_sd.unet
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=gen)
    text = torch.randn(2, 4, unet.config.cross_attention_dim, generator=gen)
    plain = unet(x, 500, encoder_hidden_states=text).sample
    state = torch.get_rng_state()
    for hook in (RandomCondition(), PerturbedTimestep()):
        with hook.apply(unet, slice(1, 2)):
            out = unet(x, 500, encoder_hidden_states=text).sample
        assert torch.equal(out[0], plain[0]) and not torch.allclose(out[1], plain[1])
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in unet.modules())
    assert torch.equal(torch.get_rng_state(), state)


def test_icg_guider_branches_name_the_reference_and_its_hook():
    guider = IndependentCondition(3.0, num_classes=10)
    hook = guider.perturbation()
    assert hook.per_row and hook.num_classes == 10 and guider.branch == "independent"
    assert TimestepGuidance(2.0).perturbation().noise_scale == 3.0


def test_condition_hooks_on_a_dit_transformer():
    from guidance.diffusion.testing import tiny_dit
    from guidance.perturbations.condition import PerturbedTimestep, RandomCondition

    transformer = tiny_dit().transformer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, transformer.config.in_channels, 8, 8, generator=gen)
    t, labels = torch.tensor([500, 500]), torch.tensor([1, 1])
    plain = transformer(x, timestep=t, class_labels=labels).sample
    for hook in (RandomCondition(seed=1), PerturbedTimestep()):
        with hook.apply(transformer, slice(0, 1)):
            out = transformer(x, timestep=t, class_labels=labels).sample
        assert torch.equal(out[1], plain[1]) and not torch.allclose(out[0], plain[0]), hook
    assert RandomCondition()._class_modules(transformer)[0][1] == transformer.config.num_embeds_ada_norm


@pytest.mark.parametrize(
    "make", [lambda w: IndependentCondition(w, num_classes=10), lambda w: TimestepGuidance(w, noise_scale=1.0)]
)
def test_icg_and_tsg_through_attach_on_the_digits_pipeline(make):
    from guidance.diffusion import attach
    from guidance.models import load_digits_pipeline

    pipe = load_digits_pipeline("ddim")

    def sample(scale):
        return pipe([3, 7], num_images_per_prompt=2, guidance_scale=scale, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    plain = sample(1.0)
    with attach(pipe, make(1.0)) as handle:
        assert torch.equal(sample(2.0), plain)  # off: the pipeline's conditional rows only
    assert handle.stats.evaluations_per_image == 4
    guider = make(3.0)
    with attach(pipe, guider) as handle:
        first, second = sample(2.0), sample(2.0)
    assert torch.equal(first, second)  # the hook's stream restarts with every run
    assert bool(torch.isfinite(first).all()) and not torch.equal(first, plain)
    assert handle.stats.branch_rows == {"cond": 16, guider.branch: 16}
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in pipe.unet.modules())


def test_icg_with_random_text_through_attach_on_tiny_sd(tiny_sd):
    from guidance.diffusion import attach

    plain = _sd_run(tiny_sd, guidance_scale=1.0, negative_prompt=None)
    with attach(tiny_sd, IndependentCondition(3.0)) as handle:
        out = _sd_run(tiny_sd, guidance_scale=2.0, negative_prompt=None)
    assert bool(torch.isfinite(out).all()) and not torch.equal(out, plain)
    assert handle.stats.branch_rows == {"cond": 12, "independent": 12}
