"""CFG++ (samplers.cfgpp): the pure steps against transcriptions of the paper's DDIM form and of
ComfyUI's ``sample_euler_cfg_pp`` / ``sample_euler_ancestral_cfg_pp``, lambda edge cases, and the
diffusers integration (``attach(..., mode="cfgpp")``) against hand-written loops over the same
tiny random-weight models."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guidance.adaptive import AdaptiveGuidance
from guidance.diffusion import attach
from guidance.diffusion.testing import tiny_dit, tiny_stable_diffusion, tiny_stable_diffusion_3
from guidance.ops import cfg
from samplers.cfgpp import (
    ddim_cfgpp_step,
    euler_ancestral_cfgpp_step,
    euler_cfgpp_step,
    flow_euler_cfgpp_step,
    sample_ddim_cfgpp,
    sample_euler_ancestral_cfgpp,
    sample_euler_cfgpp,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- reference transcriptions


def paper_ddim_cfgpp(x, eps_c, eps_u, a, a_prev, lam, eta=0.0, z=None):
    """CFG++ paper, Algorithm 1 (DDIM), with DDIM's eta for the stochastic form."""
    eps_hat = eps_u + lam * (eps_c - eps_u)
    x0_hat = (x - (1 - a) ** 0.5 * eps_hat) / a**0.5
    sigma_t = eta * ((1 - a_prev) / (1 - a)) ** 0.5 * (1 - a / a_prev) ** 0.5
    x_prev = a_prev**0.5 * x0_hat + (1 - a_prev - sigma_t**2) ** 0.5 * eps_u
    if eta > 0:
        x_prev = x_prev + sigma_t * z
    return x_prev


def comfy_get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def comfy_to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def comfy_half_log_snr(sigma, flow):
    # comfy.k_diffusion.sampling.sigma_to_half_log_snr: CONST (flow) vs EPS model sampling
    return sigma.logit().neg() if flow else sigma.log().neg()


def comfy_sample_euler_ancestral_cfg_pp(
    model, x, sigmas, cond_scale, flow, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """ComfyUI's sample_euler_ancestral_cfg_pp (the uncond_denoised comes from its post-CFG hook)."""
    for i in range(len(sigmas) - 1):
        cond_denoised, uncond_denoised = model(x, sigmas[i])
        denoised = uncond_denoised + (cond_denoised - uncond_denoised) * cond_scale  # comfy cfg_function
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            alpha_s = sigmas[i] * comfy_half_log_snr(sigmas[i], flow).exp()
            alpha_t = sigmas[i + 1] * comfy_half_log_snr(sigmas[i + 1], flow).exp()
            d = comfy_to_d(x, sigmas[i], alpha_s * uncond_denoised)
            sigma_down, sigma_up = comfy_get_ancestral_step(
                sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta=eta
            )
            sigma_down = alpha_t * sigma_down
            x = alpha_t * denoised + sigma_down * d
            if eta > 0 and s_noise > 0:
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def comfy_sample_euler_cfg_pp(model, x, sigmas, cond_scale, flow):
    return comfy_sample_euler_ancestral_cfg_pp(model, x, sigmas, cond_scale, flow, eta=0.0, s_noise=0.0)


def toy_denoiser(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w_c, w_u = torch.randn(shape[1:], generator=gen), torch.randn(shape[1:], generator=gen)

    def model(x, sigma):
        s = float(sigma)
        return torch.tanh(x * w_c / (1 + s)), torch.tanh(x * w_u / (1 + s)) * 0.5

    return model


def noise_stream(shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=gen)


# ---------------------------------------------------------------- pure steps


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("scale", [0.0, 0.3, 0.8, 1.0])
def test_sample_euler_cfgpp_matches_comfyui(flow, scale):
    shape = (2, 3, 4)
    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.1, 0.0]) if flow else torch.tensor([14.6, 6.0, 2.0, 0.5, 0.0])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * (1.0 if flow else float(sigmas[0]))
    model = toy_denoiser(shape)
    expected = comfy_sample_euler_cfg_pp(model, x, sigmas, scale, flow)
    ours = sample_euler_cfgpp(model, x, sigmas, scale, flow=flow)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_sample_euler_ancestral_cfgpp_matches_comfyui(flow, eta):
    shape = (2, 3, 4)
    sigmas = torch.tensor([0.9, 0.6, 0.3, 0.0]) if flow else torch.tensor([10.0, 3.0, 0.8, 0.0])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    model = toy_denoiser(shape)
    expected = comfy_sample_euler_ancestral_cfg_pp(
        model, x, sigmas, 0.6, flow, eta=eta, noise_sampler=noise_stream(shape)
    )
    ours = sample_euler_ancestral_cfgpp(
        model, x, sigmas, 0.6, eta=eta, noise_sampler=noise_stream(shape), flow=flow
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_ddim_cfgpp_step_matches_paper(scale, eta):
    gen = torch.Generator().manual_seed(0)
    x, c, u, z = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(4))
    a, a_prev = 0.3, 0.6
    expected = paper_ddim_cfgpp(x, c, u, a, a_prev, scale, eta, z)
    ours = ddim_cfgpp_step(x, c, u, a, a_prev, scale, eta=eta, noise=z if eta else None)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_sample_ddim_cfgpp_loop_matches_paper():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, 4, generator=gen)
    weights = torch.randn(2, 2, 4, 4, generator=gen)
    alphas = [0.05, 0.3, 0.7, 0.999]

    def model(sample, i):
        return torch.sin(sample * weights[0]), torch.cos(sample * weights[1])

    expected = x
    for i in range(3):
        expected = paper_ddim_cfgpp(expected, *model(expected, i), alphas[i], alphas[i + 1], 0.4)
    torch.testing.assert_close(sample_ddim_cfgpp(model, x, alphas, 0.4), expected, rtol=1e-5, atol=1e-5)


def test_lambda_zero_is_plain_ddim_and_euler_on_uncond():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    gen = torch.Generator().manual_seed(0)
    x, c, u = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    ddim.set_timesteps(5)
    t = int(ddim.timesteps[1])
    a, a_prev = float(ddim.alphas_cumprod[t]), float(ddim.alphas_cumprod[t - 200])
    torch.testing.assert_close(ddim_cfgpp_step(x, c, u, a, a_prev, 0.0), ddim.step(u, t, x).prev_sample)

    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    euler.set_timesteps(5)
    sigma, sigma_next = float(euler.sigmas[1]), float(euler.sigmas[2])
    x_ve = x * sigma
    euler._step_index = 1
    expected = euler.step(u, euler.timesteps[1], x_ve).prev_sample
    x0_c, x0_u = x_ve - sigma * c, x_ve - sigma * u
    torch.testing.assert_close(euler_cfgpp_step(x_ve, x0_c, x0_u, sigma, sigma_next, 0.0), expected)


def test_lambda_one_takes_x0_from_cond_and_noise_from_uncond():
    gen = torch.Generator().manual_seed(0)
    x, c, u = (torch.randn(2, 5, generator=gen) for _ in range(3))
    a, a_prev = 0.2, 0.5
    x0_c = (x - (1 - a) ** 0.5 * c) / a**0.5
    torch.testing.assert_close(
        ddim_cfgpp_step(x, c, u, a, a_prev, 1.0), a_prev**0.5 * x0_c + (1 - a_prev) ** 0.5 * u
    )


@settings(max_examples=25, deadline=None)
@given(st.floats(0.0, 1.0))
def test_equal_branches_give_the_plain_step_for_any_lambda(scale):
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    plain = paper_ddim_cfgpp(x, c, c, 0.4, 0.8, 0.0)
    torch.testing.assert_close(ddim_cfgpp_step(x, c, c, 0.4, 0.8, scale), plain, rtol=1e-5, atol=1e-6)


def test_last_step_returns_the_guided_denoised_estimate_exactly():
    gen = torch.Generator().manual_seed(0)
    x, c, u = (torch.randn(2, 5, generator=gen) for _ in range(3))
    assert torch.equal(euler_cfgpp_step(x, c, u, 0.5, 0.0, 0.7), cfg(c, u, 0.7))
    assert torch.equal(flow_euler_cfgpp_step(x, c, u, 0.5, 0.0, 0.7), cfg(c, u, 0.7))


def test_low_precision_inputs_stay_finite_and_keep_dtype():
    gen = torch.Generator().manual_seed(0)
    x, c, u = (torch.randn(2, 8, generator=gen).half() for _ in range(3))
    out = euler_cfgpp_step(x, c, u, 3.0, 1.0, 0.5)
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())
    zeros = torch.zeros(2, 8)
    assert bool(torch.isfinite(ddim_cfgpp_step(zeros, zeros, zeros, 0.5, 0.9, 0.5)).all())


@pytest.mark.parametrize("bad", [-0.1, 1.01, math.nan, math.inf, True, "0.5", torch.tensor([0.5, 2.0])])
def test_lambda_outside_unit_interval_is_rejected(bad):
    x = torch.zeros(1, 2)
    error = TypeError if isinstance(bad, (bool, str)) else ValueError
    expected = r"`scale` must be a real number" if error is TypeError else r"`scale` must .* in \[0\.0, 1\.0\]"
    with pytest.raises(error, match=expected):
        ddim_cfgpp_step(x, x, x, 0.5, 0.9, bad)
    with pytest.raises(error, match=expected):
        sample_euler_cfgpp(lambda s, sigma: (s, s), x, [1.0, 0.0], bad)


def test_bad_noise_levels_and_missing_noise_are_rejected():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="sigma > 0"):
        euler_cfgpp_step(x, x, x, 0.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="noise"):
        euler_ancestral_cfgpp_step(x, x, x, 2.0, 1.0, 0.5, noise=None)


def test_get_ancestral_step_matches_k_diffusion_and_is_defined_everywhere():
    from samplers.cfgpp import get_ancestral_step

    for sigma_from, sigma_to, eta in ((2.0, 1.0, 1.0), (14.6, 6.0, 0.5), (1.0, 1.0, 1.0), (3.0, 0.2, 2.0)):
        ours = get_ancestral_step(sigma_from, sigma_to, eta)
        assert ours == pytest.approx(
            comfy_get_ancestral_step(sigma_from, sigma_to, eta), rel=1e-12, abs=1e-15
        )
    assert get_ancestral_step(0, 0) == (0.0, 0.0)  # was a ZeroDivisionError
    assert get_ancestral_step(5.0, 0.0) == (0.0, 0.0)
    assert get_ancestral_step(2.0, 1.0, eta=0.0) == (1.0, 0.0)
    down, up = get_ancestral_step(1e200, 1e199)  # no overflow in sigma**2
    assert (
        math.isfinite(down)
        and math.isfinite(up)
        and (down / 1e199) ** 2 + (up / 1e199) ** 2 == pytest.approx(1.0)
    )


@pytest.mark.parametrize(
    "args, error, match",
    [
        (
            (1.0, 2.0),
            ValueError,
            "`sigma_to` must be <= `sigma_from`",
        ),  # was a TypeError about complex numbers
        ((0.0, 1.0), ValueError, "`sigma_to` must be <= `sigma_from`"),
        ((-1.0, -2.0), ValueError, "`sigma_from` must be a number in \\[0.0, inf\\)"),
        ((math.nan, 0.0), ValueError, "`sigma_from`"),
        ((1.0, math.inf), ValueError, "`sigma_to`"),
        ((2.0, 1.0, -0.5), ValueError, "`eta` must be a number in \\[0.0, inf\\)"),
        ((2.0, 1.0, math.nan), ValueError, "`eta`"),
        (("2", 1.0), TypeError, "`sigma_from` must be a real number"),
    ],
)
def test_get_ancestral_step_rejects_bad_levels(args, error, match):
    from samplers.cfgpp import get_ancestral_step

    with pytest.raises(error, match=match):
        get_ancestral_step(*args)


def test_step_arguments_are_checked_before_any_work():
    x = torch.zeros(1, 2)
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        euler_cfgpp_step([0.0, 0.0], x, x, 1.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="`x` and `uncond_denoised` must have the same shape"):
        euler_cfgpp_step(x, x, torch.zeros(1, 3), 1.0, 0.5, 0.5)
    with pytest.raises(TypeError, match="`cond_eps` must be a floating-point tensor"):
        ddim_cfgpp_step(x, torch.zeros(1, 2, dtype=torch.long), x, 0.5, 0.9, 0.5)
    with pytest.raises(ValueError, match="`sigma_next` must be a number in \\[0.0, inf\\)"):
        euler_cfgpp_step(x, x, x, 1.0, math.nan, 0.5)
    with pytest.raises(ValueError, match="`sigma` must be a number in \\[0.0, 1.0\\]"):
        flow_euler_cfgpp_step(x, x, x, 1.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="`alpha_cumprod` must be a number in \\(0.0, 1.0\\]"):
        ddim_cfgpp_step(x, x, x, 0.0, 0.9, 0.5)
    with pytest.raises(ValueError, match="`s_noise` must be a number in \\[0.0, inf\\)"):
        euler_ancestral_cfgpp_step(x, x, x, 2.0, 1.0, 0.5, noise=x, s_noise=-1.0)
    with pytest.raises(ValueError, match="`x` and `noise` must have the same shape"):
        euler_ancestral_cfgpp_step(x, x, x, 2.0, 1.0, 0.5, noise=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="`sigma_to` must be <= `sigma_from`"):
        euler_ancestral_cfgpp_step(x, x, x, 1.0, 2.0, 0.5, noise=x)  # an ancestral step never adds noise
    with pytest.raises(ValueError, match=r"`sigmas\[1\]` must be a number"):
        sample_euler_cfgpp(lambda s, sigma: (s, s), x, [1.0, math.nan, 0.0], 0.5)
    with pytest.raises(TypeError, match="`model` must be callable"):
        sample_euler_cfgpp(None, x, [1.0, 0.0], 0.5)
    with pytest.raises(ValueError, match="`alphas_cumprod\\[0\\]` must be a number in \\[0.0, 1.0\\]"):
        sample_ddim_cfgpp(lambda s, i: (s, s), x, [1.5, 1.0], 0.5)


def test_scale_tensor_on_the_step_path_is_checked_on_cpu_and_lambda_one_takes_cond():
    x, c, u = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"`scale` must hold finite numbers in \[0\.0, 1\.0\]"):
        euler_cfgpp_step(x, c, u, 2.0, 1.0, torch.tensor([0.5, 1.5])[:, None])
    per_sample = euler_cfgpp_step(x, c, u, 2.0, 0.0, torch.tensor([[1.0], [0.0]]))
    assert torch.equal(per_sample[0], c[0]) and torch.equal(per_sample[1], u[1])


def test_ancestral_loop_with_a_generator_is_reproducible_and_leaves_the_global_rng_alone():
    shape = (2, 3)
    model = toy_denoiser(shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    a = sample_euler_ancestral_cfgpp(
        model, x, [5.0, 2.0, 0.5, 0.0], 0.5, generator=torch.Generator().manual_seed(1)
    )
    b = sample_euler_ancestral_cfgpp(
        model, x, [5.0, 2.0, 0.5, 0.0], 0.5, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- diffusers integration

PROMPTS = ["a cat", "dog"]


def _prompt_embeds(pipe):
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    return torch.cat([negative, embeds])


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_stable_diffusion()


@pytest.mark.parametrize("scale", [0.0, 0.6, 1.0])
def test_attached_cfgpp_with_ddim_matches_the_paper_loop(sd_pipe, scale):
    pipe = sd_pipe
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = _prompt_embeds(pipe)
    sched = pipe.scheduler
    sched.set_timesteps(3)
    x = latents.clone()
    for t in sched.timesteps:
        u, c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
        prev_t = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        a = float(sched.alphas_cumprod[int(t)])
        a_prev = float(sched.alphas_cumprod[prev_t]) if prev_t >= 0 else float(sched.final_alpha_cumprod)
        x = paper_ddim_cfgpp(x, c, u, a, a_prev, scale)
    with attach(pipe, scale, mode="cfgpp") as handle:
        out = pipe(
            PROMPTS, guidance_scale=2.0, num_inference_steps=3, latents=latents, output_type="latent"
        ).images
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-5)
    assert handle.stats.evaluations == 2 * 2 * 3
    assert "step" not in sched.__dict__  # detached


@pytest.mark.parametrize("ancestral", [False, True])
def test_attached_cfgpp_with_euler_matches_comfyui(sd_pipe, ancestral):
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    pipe = sd_pipe
    original = pipe.scheduler
    kind = EulerAncestralDiscreteScheduler if ancestral else EulerDiscreteScheduler
    pipe.scheduler = kind.from_config(original.config)
    try:
        sched = pipe.scheduler
        sched.set_timesteps(3)
        sigmas, timesteps = sched.sigmas.clone(), sched.timesteps.clone()
        emb = _prompt_embeds(pipe)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=gen) * sched.init_noise_sigma
        step_of = {float(s): i for i, s in enumerate(sigmas[:-1])}

        def model(sample, sigma):
            t = timesteps[step_of[float(sigma)]]
            x_in = sample / (sigma**2 + 1) ** 0.5
            u, c = pipe.unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=emb).sample.chunk(2)
            return sample - sigma * c, sample - sigma * u

        noise = lambda s, s_next: torch.randn(2, 4, 8, 8, generator=gen)  # noqa: E731
        expected = comfy_sample_euler_ancestral_cfg_pp(
            model, x, sigmas, 0.7, flow=False, eta=1.0 if ancestral else 0.0, s_noise=1.0, noise_sampler=noise
        )
        with attach(pipe, 0.7, mode="cfgpp"):
            out = pipe(
                PROMPTS,
                guidance_scale=2.0,
                num_inference_steps=3,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            ).images
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    finally:
        pipe.scheduler = original


def test_attached_cfgpp_with_flow_matching_matches_comfyui():
    pipe = tiny_stable_diffusion_3()
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=4
    )
    emb, pool = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sched = pipe.scheduler
    sched.set_timesteps(3)
    sigmas, timesteps = sched.sigmas.clone(), sched.timesteps.clone()
    step_of = {float(s): i for i, s in enumerate(sigmas[:-1])}

    def model(sample, sigma):
        t = timesteps[step_of[float(sigma)]]
        v = pipe.transformer(
            hidden_states=torch.cat([sample, sample]),
            timestep=t.expand(4),
            encoder_hidden_states=emb,
            pooled_projections=pool,
        ).sample
        u, c = v.chunk(2)
        return sample - sigma * c, sample - sigma * u

    expected = comfy_sample_euler_cfg_pp(model, latents, sigmas, 0.5, flow=True)
    with attach(pipe, 0.5, mode="cfgpp"):
        out = pipe(
            PROMPTS,
            guidance_scale=2.0,
            num_inference_steps=3,
            latents=latents,
            output_type="latent",
            max_sequence_length=4,
        ).images
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_attached_cfgpp_on_dit_steps_both_halves_with_cond_first_batch():
    pipe = tiny_dit()
    labels = torch.tensor([1, 2])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    sched = pipe.scheduler
    sched.set_timesteps(3)
    for t in sched.timesteps:
        eps = pipe.transformer(
            torch.cat([x, x]),
            timestep=t.expand(4),
            class_labels=torch.cat([labels, torch.full_like(labels, 1000)]),
        ).sample[:, :4]
        c, u = eps.chunk(2)
        prev_t = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        a = float(sched.alphas_cumprod[int(t)])
        a_prev = float(sched.alphas_cumprod[prev_t]) if prev_t >= 0 else float(sched.final_alpha_cumprod)
        x = paper_ddim_cfgpp(x, c, u, a, a_prev, 0.8)
    with attach(pipe, 0.8, mode="cfgpp"):
        images = pipe(
            class_labels=[1, 2],
            guidance_scale=2.0,
            num_inference_steps=3,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images
    decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(images, (decoded / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)


def test_cfgpp_with_adaptive_guidance_saves_evaluations(sd_pipe):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with attach(sd_pipe, 0.6, mode="cfgpp", adaptive=AdaptiveGuidance(-1.0)) as handle:
        out = sd_pipe(
            PROMPTS, guidance_scale=2.0, num_inference_steps=3, latents=latents, output_type="latent"
        ).images
    assert handle.stats.uncond_rows == 2 and handle.stats.cond_rows == 6  # uncond at step 0 only
    assert handle.stats.passed_at == [0, 0]
    assert bool(torch.isfinite(out).all())


def test_cfgpp_rejects_schedulers_it_cannot_drive_and_bad_lambda(sd_pipe):
    from diffusers import DDIMScheduler, PNDMScheduler

    original = sd_pipe.scheduler
    try:
        sd_pipe.scheduler = PNDMScheduler.from_config(original.config)
        with pytest.raises(ValueError, match="PNDMScheduler"):
            attach(sd_pipe, 0.5, mode="cfgpp")
        sd_pipe.scheduler = DDIMScheduler.from_config(original.config, thresholding=True)
        with pytest.raises(ValueError, match="thresholding"):
            attach(sd_pipe, 0.5, mode="cfgpp")
    finally:
        sd_pipe.scheduler = original
    assert getattr(sd_pipe, "_guidance_handle", None) is None
    with attach(sd_pipe, 1.5, mode="cfgpp"):
        with pytest.raises(ValueError, match="lambda"):
            sd_pipe(
                PROMPTS, guidance_scale=2.0, num_inference_steps=2, height=16, width=16, output_type="latent"
            )
