"""Diffusion operators of guidance.ops: parity with diffusers / ComfyUI / the papers, and edge cases."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer as DiffusersMomentumBuffer
from diffusers.guiders.adaptive_projected_guidance import normalized_guidance
from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg as pipeline_rescale_noise_cfg,
)

from guidance import ops


def _pair(shape=(2, 4, 8, 8), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(shape, generator=gen).to(dtype)
    uncond = (0.8 * cond.float() + 0.3 * torch.randn(shape, generator=gen)).to(dtype)
    return cond, uncond


def _negative(shape=(2, 4, 8, 8), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


ALL_OPERATORS = {
    "cfg_rescaled": lambda c, u, w: ops.cfg_rescaled(c, u, w, phi=0.7),
    "apg_paper": lambda c, u, w: ops.apg(c, u, w, eta=0.3, norm_threshold=2.0),
    "apg_diffusers": lambda c, u, w: ops.apg(c, u, w, eta=1.0, convention="diffusers"),
    "apg_comfyui": lambda c, u, w: ops.apg(c, u, w, eta=0.5, convention="comfyui", norm_threshold=5.0),
    "cfg_zero_star": lambda c, u, w: ops.cfg_zero_star(c, u, w),
    "perp_neg": lambda c, u, w: ops.perp_neg(c, u, torch.ones_like(c) * 0.5 + u, w, neg_scale=1.0),
    "beta_cfg": lambda c, u, w: ops.beta_cfg(c, u, w, gamma=1.0),
}


# ---------------------------------------------------------------------------------------- scale 1


@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
def test_scale_one_returns_cond_itself(name):
    cond, uncond = _pair()
    assert ALL_OPERATORS[name](cond, uncond, 1.0) is cond


@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
def test_tensor_scale_guides_each_sample_and_keeps_cond_where_one(name):
    cond, uncond = _pair()
    out = ALL_OPERATORS[name](cond, uncond, torch.tensor([1.0, 4.0]))
    assert torch.equal(out[0], cond[0])
    expected = ALL_OPERATORS[name](cond[1:], uncond[1:], 4.0)
    torch.testing.assert_close(out[1:], expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(out[1], cond[1])


def test_apg_scale_one_leaves_momentum_untouched():
    cond, uncond = _pair()
    buffer = ops.MomentumBuffer(-0.5)
    ops.apg(cond, uncond, 1.0, momentum_buffer=buffer)
    assert buffer.running_average is None


# ---------------------------------------------------------------------------------------- rescale


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_is_bit_identical_to_diffusers(phi):
    cond, uncond = _pair()
    guided = ops.cfg(cond, uncond, 7.5)
    ours = ops.rescale(guided, cond, phi)
    assert torch.equal(ours, rescale_noise_cfg(guided, cond, phi))
    assert torch.equal(ours, pipeline_rescale_noise_cfg(guided, cond, guidance_rescale=phi))


def test_cfg_rescaled_matches_pipeline_guidance_rescale():
    # StableDiffusionPipeline: noise_pred = u + w (c - u); then rescale_noise_cfg(noise_pred, c, guidance_rescale)
    cond, uncond = _pair(shape=(3, 4, 16, 16), seed=3)
    expected = pipeline_rescale_noise_cfg(uncond + 5.0 * (cond - uncond), cond, guidance_rescale=0.7)
    assert torch.equal(ops.cfg_rescaled(cond, uncond, 5.0, phi=0.7), expected)


def test_rescale_moves_std_to_cond_std():
    cond, uncond = _pair()
    out = ops.cfg_rescaled(cond, uncond, 9.0, phi=1.0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)


def test_rescale_constant_guided_gives_no_nan():
    guided = torch.full((2, 3, 4), 2.0)
    cond = torch.randn(2, 3, 4)
    out = ops.rescale(guided, cond, 0.7)
    assert torch.isfinite(out).all()
    assert torch.equal(out, guided)  # nothing to rescale: left as is


# ---------------------------------------------------------------------------------------- APG


@pytest.mark.parametrize("momentum", [None, -0.5, 0.3])
@pytest.mark.parametrize("norm_threshold", [None, 2.0, 15.0])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_apg_diffusers_convention_is_bit_identical_to_diffusers(momentum, norm_threshold, eta):
    ours_buffer = None if momentum is None else ops.MomentumBuffer(momentum)
    ref_buffer = None if momentum is None else DiffusersMomentumBuffer(momentum)
    for step in range(4):  # several steps so the momentum buffer matters
        cond, uncond = _pair(seed=step)
        ours = ops.apg(
            cond,
            uncond,
            6.0,
            eta=eta,
            momentum_buffer=ours_buffer,
            norm_threshold=norm_threshold,
            convention="diffusers",
        )
        ref = normalized_guidance(cond, uncond, 6.0, ref_buffer, eta, norm_threshold or 0.0, False)
        assert torch.equal(ours, ref), f"step {step}"


def test_apg_comfyui_convention_equals_diffusers_original_formulation():
    cond, uncond = _pair()
    ours = ops.apg(cond, uncond, 4.0, eta=0.5, norm_threshold=3.0, convention="comfyui")
    ref = normalized_guidance(cond, uncond, 4.0, None, 0.5, 3.0, True)
    assert torch.equal(ours, ref)


def _paper_apg_transcription(cond, uncond, scale, eta, momentum, norm_threshold, state):
    """Sadat et al. (ICLR 2025), Algorithm 1, in float64 on x0 predictions of shape (B, C, H, W)."""
    cond, uncond = cond.double(), uncond.double()
    diff = cond - uncond
    if momentum is not None:
        state["running_average"] = diff + momentum * state.get("running_average", 0.0)
        diff = state["running_average"]
    if norm_threshold is not None:
        diff_norm = diff.norm(p=2, dim=[-1, -2, -3], keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / diff_norm)
    v1 = torch.nn.functional.normalize(cond, dim=[-1, -2, -3])
    parallel = (diff * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
    orthogonal = diff - parallel
    return cond + (scale - 1) * (orthogonal + eta * parallel)


@pytest.mark.parametrize("momentum", [None, -0.5])
@pytest.mark.parametrize("norm_threshold", [None, 4.0])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_apg_paper_form_matches_paper_algorithm(momentum, norm_threshold, eta):
    buffer = None if momentum is None else ops.MomentumBuffer(momentum)
    state: dict = {}
    for step in range(4):
        cond, uncond = _pair(seed=10 + step)
        ours = ops.apg(cond, uncond, 7.5, eta=eta, momentum_buffer=buffer, norm_threshold=norm_threshold)
        ref = _paper_apg_transcription(cond, uncond, 7.5, eta, momentum, norm_threshold, state)
        torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)


def test_apg_paper_default_eta_drops_parallel_part():
    cond, uncond = _pair()
    out = ops.apg(cond, uncond, 5.0)
    update = (out - cond).flatten(1).double()
    # The update is orthogonal to cond (eta = 0).
    cosine = torch.nn.functional.cosine_similarity(update, cond.flatten(1).double(), dim=1)
    assert cosine.abs().max() < 1e-6


def test_apg_paper_with_eta_one_and_no_extras_is_cfg():
    cond, uncond = _pair()
    torch.testing.assert_close(
        ops.apg(cond, uncond, 5.0, eta=1.0), ops.cfg(cond, uncond, 5.0), rtol=1e-5, atol=1e-5
    )


def _comfyui_apg_transcription(momentum, norm_threshold, eta):
    """ComfyUI comfy_extras/nodes_apg.py (pre-CFG function) followed by ComfyUI's CFG combine."""
    running_avg = 0
    prev_sigma = None

    def project(v0, v1):
        v1 = torch.nn.functional.normalize(v1, dim=[-1, -2, -3])
        v0_parallel = (v0 * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
        return v0_parallel, v0 - v0_parallel

    def step(cond, uncond, sigma, cond_scale):
        nonlocal running_avg, prev_sigma
        if prev_sigma is not None and sigma > prev_sigma:
            running_avg = 0
        prev_sigma = sigma
        guidance = cond - uncond
        if momentum > 0:
            if not torch.is_tensor(running_avg):
                running_avg = guidance
            else:
                running_avg = momentum * running_avg + guidance
            guidance = running_avg
        if norm_threshold > 0:
            guidance_norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)
            scale = torch.minimum(torch.ones_like(guidance_norm), norm_threshold / guidance_norm)
            guidance = guidance * scale
        parallel, orthogonal = project(guidance, cond)
        modified_cond = (uncond + (orthogonal + eta * parallel)) + (cond - uncond) / cond_scale
        return uncond + (modified_cond - uncond) * cond_scale  # comfy.samplers.cfg_function

    return step


@pytest.mark.parametrize("momentum", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("norm_threshold", [0.0, 5.0])
def test_apg_comfyui_convention_matches_comfyui_node(momentum, norm_threshold):
    reference = _comfyui_apg_transcription(momentum, norm_threshold, eta=0.7)
    buffer = ops.MomentumBuffer(momentum) if momentum > 0 else None
    sigmas = [14.6, 7.0, 2.1, 0.5]
    for run in range(2):  # the second run checks the reset (ComfyUI: sigma goes up again)
        if buffer is not None:
            buffer.reset()
        for step, sigma in enumerate(sigmas):
            cond, uncond = _pair(seed=20 + step + run)
            ours = ops.apg(
                cond,
                uncond,
                6.0,
                eta=0.7,
                momentum_buffer=buffer,
                norm_threshold=norm_threshold or None,
                convention="comfyui",
            )
            torch.testing.assert_close(ours, reference(cond, uncond, sigma, 6.0), rtol=1e-5, atol=1e-5)


def test_apg_conventions_differ_as_documented():
    cond, uncond = _pair()
    kwargs = {"eta": 0.5, "norm_threshold": None}
    paper = ops.apg(cond, uncond, 4.0, convention="paper", **kwargs)
    diffusers = ops.apg(cond, uncond, 4.0, convention="diffusers", **kwargs)
    comfy = ops.apg(cond, uncond, 4.0, convention="comfyui", **kwargs)
    update = (paper - cond) / 3.0
    torch.testing.assert_close(comfy, cond + 4.0 * update, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diffusers, uncond + 4.0 * update, rtol=1e-5, atol=1e-5)


def test_apg_norm_threshold_caps_the_update():
    cond, uncond = _pair()
    out = ops.apg(cond, uncond * -3, 2.0, eta=1.0, norm_threshold=0.5)
    # update = out - cond = (w - 1) * (d_perp + d_par) with ||d|| <= 0.5
    assert (out - cond).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5


def test_apg_dims_reduce_only_over_named_dims():
    cond, uncond = _pair(shape=(2, 3, 5))
    out = ops.apg(cond, uncond, 3.0, eta=0.2, norm_threshold=1.0, dims=-1)
    for b in range(2):
        for t in range(3):
            row = ops.apg(cond[b : b + 1, t], uncond[b : b + 1, t], 3.0, eta=0.2, norm_threshold=1.0)
            torch.testing.assert_close(out[b, t], row[0], rtol=1e-6, atol=1e-6)


def test_momentum_buffer_shape_change_needs_reset():
    buffer = ops.MomentumBuffer(0.5)
    buffer.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="reset"):
        buffer.update(torch.ones(4, 3))
    buffer.reset()
    assert torch.equal(buffer.update(torch.ones(4, 3)), torch.ones(4, 3))


# ---------------------------------------------------------------------------------------- CFG-Zero*


def test_zero_star_alpha_is_bit_identical_to_diffusers():
    cond, uncond = _pair()
    ref = cfg_zero_star_scale(cond.flatten(1), uncond.flatten(1)).view(-1, 1, 1, 1)
    assert torch.equal(ops.zero_star_alpha(cond, uncond), ref)


def test_cfg_zero_star_is_bit_identical_to_diffusers_formula():
    cond, uncond = _pair()
    alpha = cfg_zero_star_scale(cond.flatten(1), uncond.flatten(1)).view(-1, 1, 1, 1)
    scaled = uncond * alpha
    expected = scaled + 5.0 * (cond - scaled)
    assert torch.equal(ops.cfg_zero_star(cond, uncond, 5.0), expected)


def test_zero_star_alpha_projects_cond_on_uncond():
    uncond = torch.randn(3, 10)
    cond = 2.5 * uncond
    torch.testing.assert_close(ops.zero_star_alpha(cond, uncond), torch.full((3, 1), 2.5))


# ---------------------------------------------------------------------------------------- Perp-Neg


def _comfyui_perp_neg(noise_pred_pos, noise_pred_neg, noise_pred_nocond, neg_scale, cond_scale):
    """ComfyUI comfy_extras/nodes_perpneg.py `perp_neg` (reduces over the whole batch)."""
    pos = noise_pred_pos - noise_pred_nocond
    neg = noise_pred_neg - noise_pred_nocond
    perp = neg - ((torch.mul(neg, pos).sum()) / (torch.norm(pos) ** 2)) * pos
    return noise_pred_nocond + cond_scale * (pos - perp * neg_scale)


@pytest.mark.parametrize("neg_scale", [0.0, 1.0, 2.5])
def test_perp_neg_matches_comfyui_for_batch_one(neg_scale):
    cond, uncond = _pair(shape=(1, 4, 8, 8))
    negative = _negative(shape=(1, 4, 8, 8))
    ours = ops.perp_neg(cond, uncond, negative, 6.0, neg_scale)
    torch.testing.assert_close(
        ours, _comfyui_perp_neg(cond, negative, uncond, neg_scale, 6.0), rtol=1e-5, atol=1e-5
    )


def test_perp_neg_is_per_sample():
    cond, uncond = _pair()
    negative = _negative()
    out = ops.perp_neg(cond, uncond, negative, 6.0)
    for b in range(2):
        one = ops.perp_neg(cond[b : b + 1], uncond[b : b + 1], negative[b : b + 1], 6.0)
        torch.testing.assert_close(out[b : b + 1], one)


def test_perp_neg_removes_only_the_orthogonal_negative_part():
    cond, uncond = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)
    parallel_negative = torch.tensor([[3.0, 0.0]])  # negative along the positive direction: no effect
    torch.testing.assert_close(ops.perp_neg(cond, uncond, parallel_negative, 4.0), ops.cfg(cond, uncond, 4.0))
    assert torch.equal(ops.perp_neg(cond, uncond, uncond, 4.0, neg_scale=3.0), ops.cfg(cond, uncond, 4.0))


# ---------------------------------------------------------------------------------------- beta-CFG


def test_beta_cfg_matches_authors_formula():
    cond, uncond = _pair()
    diff = cond - uncond
    norm = torch.norm(diff, p=2, dim=(1, 2, 3)).reshape(-1, 1, 1, 1)
    for gamma in (0.0, 0.5, 1.0):
        expected = uncond + 7.5 * (diff / norm**gamma)
        torch.testing.assert_close(ops.beta_cfg(cond, uncond, 7.5, gamma), expected, rtol=1e-6, atol=1e-6)


def test_beta_cfg_gamma_zero_is_cfg():
    cond, uncond = _pair()
    torch.testing.assert_close(ops.beta_cfg(cond, uncond, 3.0, gamma=0.0), ops.cfg(cond, uncond, 3.0))


# ---------------------------------------------------------------------------------------- zero norms


ZERO_CASES = {
    "cond_zero": lambda c, u: (torch.zeros_like(c), u),
    "cond_equals_uncond": lambda c, u: (c, c.clone()),
    "both_zero": lambda c, u: (torch.zeros_like(c), torch.zeros_like(u)),
    "uncond_zero": lambda c, u: (c, torch.zeros_like(u)),
}


@pytest.mark.parametrize("case", sorted(ZERO_CASES))
def test_zero_norm_vectors_give_no_nan(case):
    cond, uncond = ZERO_CASES[case](*_pair())
    buffer = ops.MomentumBuffer(-0.5)
    outputs = [
        ops.cfg_rescaled(cond, uncond, 7.0),
        ops.rescale(uncond, cond, 0.7),
        ops.cfg_zero_star(cond, uncond, 7.0),
        ops.perp_neg(cond, uncond, uncond.clone(), 7.0),
        ops.perp_neg(cond, uncond, cond.clone(), 7.0),
        ops.beta_cfg(cond, uncond, 7.0),
        ops.beta_cfg(cond, uncond, 7.0, gamma=0.5),
    ]
    for convention in ops.APG_CONVENTIONS:
        outputs.append(ops.apg(cond, uncond, 7.0, eta=0.5, norm_threshold=1.0, convention=convention))
    outputs.append(ops.apg(cond, uncond, 7.0, momentum_buffer=buffer))
    outputs.append(ops.apg(cond, uncond, 7.0, momentum_buffer=buffer))
    for out in outputs:
        assert torch.isfinite(out).all()


def test_one_element_per_sample_gives_no_nan():
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0])  # (B,) inputs: one scalar per sample
    for out in (
        ops.cfg_rescaled(cond, uncond, 3.0),
        ops.apg(cond, uncond, 3.0, eta=0.5, norm_threshold=1.0),
        ops.cfg_zero_star(cond, uncond, 3.0),
        ops.beta_cfg(cond, uncond, 3.0),
        ops.perp_neg(cond, uncond, torch.tensor([0.0, 1.0]), 3.0),
    ):
        assert out.shape == cond.shape
        assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
def test_low_precision_inputs(name, dtype):
    cond32, uncond32 = _pair()
    cond, uncond = cond32.to(dtype), uncond32.to(dtype)
    out = ALL_OPERATORS[name](cond, uncond, 5.0)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    reference = ALL_OPERATORS[name](cond.float(), uncond.float(), 5.0)
    tol = 1e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(out.float(), reference, rtol=tol, atol=tol * 5)


def test_half_precision_norms_do_not_overflow():
    # sum of squares of 4 * 32 * 32 values of ~200 overflows float16 (max 65504): reductions run in float32
    cond = torch.full((1, 4, 32, 32), 200.0, dtype=torch.float16)
    uncond = torch.zeros_like(cond)
    uncond[..., 0, :] = 100.0
    out = ops.apg(cond, uncond, 4.0, eta=0.5, norm_threshold=10.0)
    expected = ops.apg(cond.float(), uncond.float(), 4.0, eta=0.5, norm_threshold=10.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=1e-3, atol=0.5)
    assert torch.isfinite(ops.beta_cfg(cond, uncond, 4.0)).all()
    assert torch.isfinite(ops.cfg_rescaled(cond, uncond, 4.0)).all()


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda c, u: ops.rescale(c, u, 1.5), "phi"),
        (lambda c, u: ops.rescale(c, u, -0.1), "phi"),
        (lambda c, u: ops.cfg_rescaled(c, u, 3.0, phi=float("nan")), "phi"),
        (lambda c, u: ops.apg(c, u, 3.0, convention="auto1111"), "convention"),
        (lambda c, u: ops.apg(c, u, 3.0, eta=math.inf), "eta"),
        (lambda c, u: ops.apg(c, u, 3.0, norm_threshold=-1.0), "norm_threshold"),
        (lambda c, u: ops.apg(c, u, 3.0, norm_threshold=math.inf), "norm_threshold"),
        (lambda c, u: ops.MomentumBuffer(1.5), "momentum"),
        (
            lambda c, u: ops.apg(c, u, 3.0, momentum_buffer=ops.MomentumBuffer(-0.5), convention="comfyui"),
            "momentum",
        ),
        (lambda c, u: ops.apg(c, u, 3.0, dims=(5,)), "dims"),
        (lambda c, u: ops.perp_neg(c, u, u, 3.0, neg_scale=-1.0), "neg_scale"),
        (lambda c, u: ops.perp_neg(c, u, u[:1], 3.0), "same shape"),
        (lambda c, u: ops.beta_cfg(c, u, 3.0, gamma=-1.0), "gamma"),
        (lambda c, u: ops.cfg_zero_star(c, u[:1], 3.0), "same shape"),
        (lambda c, u: ops.apg(c, u[:1], 3.0), "same shape"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    cond, uncond = _pair()
    with pytest.raises(ValueError, match=argument):
        call(cond, uncond)


# ---------------------------------------------------------------------------------------- contracts (issue 11)


@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_python_scales_are_rejected(name, bad):
    cond, uncond = _pair()
    with pytest.raises(ValueError, match="`scale` must be a finite real number"):
        ALL_OPERATORS[name](cond, uncond, bad)


@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
def test_per_sample_scale_of_wrong_length_is_a_clear_error(name):
    cond, uncond = _pair()
    with pytest.raises(ValueError, match=r"tensor of shape \(\), \(1,\) or \(2,\)"):
        ALL_OPERATORS[name](cond, uncond, torch.ones(3))


@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
def test_tensor_scale_zero_gives_no_nan(name):
    cond, uncond = _pair()
    out = ALL_OPERATORS[name](cond, uncond, torch.tensor([0.0, 2.0]))
    assert torch.isfinite(out).all()


def test_perp_neg_needs_a_negative_tensor():
    cond, uncond = _pair()
    with pytest.raises(TypeError, match="`negative` must be a torch.Tensor"):
        ops.perp_neg(cond, uncond, None, 3.0)


def test_rescale_of_one_value_per_sample_does_not_couple_samples():
    cond, guided = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 5.0, 9.0])
    out = ops.rescale(guided, cond, 0.7)
    assert torch.equal(out, guided)  # a single value has no std: each sample is left as is
    assert torch.equal(ops.rescale(guided[:1], cond[:1], 0.7), out[:1])
    two = ops.cfg_rescaled(cond, cond * 0.5, 3.0, phi=0.7)
    assert torch.equal(two[0], ops.cfg_rescaled(cond[:1], cond[:1] * 0.5, 3.0, phi=0.7)[0])


def test_cfg_rescaled_in_half_precision_does_not_overflow_before_rescaling():
    cond = torch.tensor([[6e4, -6e4, 6e4, -6e4]], dtype=torch.float16)
    out = ops.cfg_rescaled(cond, -cond, 3.0, phi=1.0)  # u + 3 (c - u) = 5c overflows float16; rescaled it is c
    assert torch.equal(out, cond)


SCALES_OF_MAGNITUDE = [1e-30, 1e-13, 1e20]


@pytest.mark.parametrize("magnitude", SCALES_OF_MAGNITUDE)
def test_perp_neg_is_scale_invariant(magnitude):
    cond, uncond = _pair()
    negative = _negative()
    expected = ops.perp_neg(cond, uncond, negative, 4.0)
    out = ops.perp_neg(cond * magnitude, uncond * magnitude, negative * magnitude, 4.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out / magnitude, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("magnitude", SCALES_OF_MAGNITUDE)
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_beta_cfg_is_scale_invariant(magnitude, gamma):
    cond, _ = _pair()
    zero = torch.zeros_like(cond)  # u = 0: the output is w d / ||d||^gamma, homogeneous of degree 1 - gamma
    expected = ops.beta_cfg(cond, zero, 4.0, gamma)
    out = ops.beta_cfg(cond * magnitude, zero, 4.0, gamma)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out / magnitude ** (1 - gamma), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("magnitude", SCALES_OF_MAGNITUDE)
@pytest.mark.parametrize("convention", ops.APG_CONVENTIONS)
def test_apg_is_scale_invariant(magnitude, convention):
    cond, uncond = _pair()
    expected = ops.apg(cond, uncond, 4.0, eta=0.3, convention=convention)
    out = ops.apg(cond * magnitude, uncond * magnitude, 4.0, eta=0.3, convention=convention)
    torch.testing.assert_close(out / magnitude, expected, rtol=1e-5, atol=1e-5)
    capped = ops.apg(cond * magnitude, uncond * magnitude, 4.0, eta=0.3, norm_threshold=1.0)
    assert torch.isfinite(capped).all()


def test_apg_on_tiny_inputs_is_not_dominated_by_an_epsilon():
    cond, uncond = torch.tensor([[1e-13, 1e-13]]), torch.tensor([[0.0, 1e-13]])
    torch.testing.assert_close(ops.apg(cond, uncond, 3.0), torch.tensor([[2e-13, 0.0]]), rtol=1e-6, atol=0)


def test_zero_star_alpha_survives_overflowing_sums():
    cond, uncond = _pair()
    expected = ops.zero_star_alpha(cond, uncond, eps=0.0)
    torch.testing.assert_close(ops.zero_star_alpha(cond * 1e20, uncond * 1e20, eps=0.0), expected)
    assert torch.equal(ops.zero_star_alpha(cond, torch.zeros_like(uncond), eps=0.0), torch.zeros(2, 1, 1, 1))


def test_cosine_dims_must_not_include_the_batch_dimension():
    cond, uncond = _pair()
    with pytest.raises(ValueError, match="batch dimension"):
        ops.apg(cond, uncond, 3.0, dims=(0, 1))
    with pytest.raises(TypeError, match="dims"):
        ops.beta_cfg(cond, uncond, 3.0, dims="12")


@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
def test_inputs_are_not_modified(name):
    cond, uncond = _pair()
    before = cond.clone(), uncond.clone()
    ALL_OPERATORS[name](cond, uncond, torch.tensor([1.0, 3.0]))
    ALL_OPERATORS[name](cond, uncond, 3.0)
    assert torch.equal(cond, before[0]) and torch.equal(uncond, before[1])


# ---------------------------------------------------------------------------------------- no device sync


class _ReadsValues(torch.overrides.TorchFunctionMode):
    """Records the tensor methods that copy values to the host (a device sync on a GPU)."""

    SYNCING = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SYNCING:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
def test_diffusion_operators_never_read_tensor_values(name):
    cond, uncond = _pair()
    with _ReadsValues() as spy:
        ALL_OPERATORS[name](cond, uncond, torch.tensor([1.0, 4.0]))
        ALL_OPERATORS[name](cond, uncond, 4.0)
        ops.cfg(cond, uncond, torch.tensor([0.0, 4.0]))
    assert spy.calls == []


def test_logit_operators_read_values_once_per_call():
    cond, uncond = torch.randn(2, 50), torch.randn(2, 50)
    for op in (ops.cfg_logits, ops.cfg_log_probs):
        with _ReadsValues() as spy:
            op(cond, uncond, torch.tensor([1.0, 2.0]))
        assert spy.calls == ["__bool__"]  # "is every entry finite?": the masked path only when needed
