"""guidance.spaces: prediction-type conversions, checked against diffusers' schedulers.

The levels are read off the schedulers by the adapter (guidance.diffusion.schedulers).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from guidance.diffusion.schedulers import noise_level
from guidance.diffusion.schedulers import prediction_type as scheduler_prediction_type
from guidance.spaces import (
    PREDICTION_TYPES,
    NoiseLevel,
    convert,
    from_x0,
    normalize_prediction_type,
    to_x0,
)


def _tensors(seed=0, shape=(2, 4, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _forward(level: NoiseLevel, x0: torch.Tensor, eps: torch.Tensor):
    """x_t and every prediction type's target for a known (x0, eps)."""
    a, s = level.alpha, level.sigma
    x_t = a * x0 + s * eps
    r = (a * a + s * s) ** 0.5
    targets = {"epsilon": eps, "sample": x0, "v_prediction": (a * eps - s * x0) / r}
    if level.is_flow:
        targets = {"epsilon": eps, "sample": x0, "flow_prediction": eps - x0}
    return x_t, targets


LEVELS = {
    "ddpm": NoiseLevel.ddpm(0.3),
    "ddpm_high_noise": NoiseLevel.ddpm(0.004),
    "flow": NoiseLevel.flow_matching(0.7),
    "flow_pure_noise": NoiseLevel.flow_matching(1.0),
    "karras": NoiseLevel.karras(14.6),
    "per_sample": NoiseLevel.ddpm(torch.tensor([0.9, 0.2])),
}


@pytest.mark.parametrize("level_name", sorted(LEVELS))
def test_to_x0_and_from_x0_recover_the_truth(level_name):
    level = LEVELS[level_name]
    x0, eps = _tensors()
    alpha = level.alpha.reshape(-1, 1, 1, 1) if isinstance(level.alpha, torch.Tensor) else level.alpha
    sigma = level.sigma.reshape(-1, 1, 1, 1) if isinstance(level.sigma, torch.Tensor) else level.sigma
    x_t, targets = _forward(NoiseLevel(alpha, sigma, level.is_flow), x0, eps)
    for prediction_type, target in targets.items():
        if prediction_type == "epsilon" and level_name == "flow_pure_noise":
            continue  # alpha = 0: eps says nothing about x0 (tested below)
        torch.testing.assert_close(to_x0(target, x_t, prediction_type, level), x0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(from_x0(x0, x_t, prediction_type, level), target, rtol=1e-4, atol=1e-4)


def test_sample_prediction_is_returned_as_is():
    x0, x_t = _tensors()
    assert to_x0(x0, x_t, "x0", NoiseLevel.ddpm(0.5)) is x0
    assert from_x0(x0, x_t, "sample", NoiseLevel.ddpm(0.5)) is x0
    assert convert(x0, x_t, "eps", "epsilon", NoiseLevel.ddpm(0.5)) is x0


def test_convert_between_eps_and_v():
    x0, eps = _tensors()
    level = NoiseLevel.ddpm(0.6)
    x_t, targets = _forward(level, x0, eps)
    torch.testing.assert_close(convert(eps, x_t, "epsilon", "v_prediction", level), targets["v_prediction"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_scheduler_pred_original_sample(prediction_type):
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    model_output, sample = _tensors(seed=1)
    for t in scheduler.timesteps[[0, 4, 9]]:
        expected = scheduler.step(model_output, t, sample).pred_original_sample
        level = noise_level(scheduler, t)
        torch.testing.assert_close(to_x0(model_output, sample, prediction_type, level), expected)
        assert scheduler_prediction_type(scheduler) == prediction_type


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("use_karras_sigmas", [False, True])
def test_euler_scheduler_in_the_denoiser_input_frame(prediction_type, use_karras_sigmas):
    # The denoiser sees scale_model_input(x) = x / sqrt(1 + sigma^2); from_scheduler describes that input.
    scheduler = EulerDiscreteScheduler(prediction_type=prediction_type, use_karras_sigmas=use_karras_sigmas)
    scheduler.set_timesteps(6)
    model_output, latents = _tensors(seed=2)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        level = noise_level(scheduler, t)
        ours = to_x0(model_output, model_input, prediction_type, level)
        # k-diffusion view of the same step: unscaled latents, x = x0 + sigma * eps
        karras = NoiseLevel.karras(float(scheduler.sigmas[scheduler.step_index]))
        torch.testing.assert_close(
            to_x0(model_output, latents, prediction_type, karras), ours, rtol=1e-4, atol=1e-4
        )
        expected = scheduler.step(model_output, t, latents).pred_original_sample
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_dpm_solver_convert_model_output():
    scheduler = DPMSolverMultistepScheduler(prediction_type="v_prediction", use_karras_sigmas=True)
    scheduler.set_timesteps(8)
    model_output, sample = _tensors(seed=3)
    for t in scheduler.timesteps[:3]:
        if scheduler.step_index is None:
            scheduler._init_step_index(t)
        expected = scheduler.convert_model_output(model_output, sample=sample)  # dpmsolver++: x0
        level = noise_level(scheduler, t)
        torch.testing.assert_close(
            to_x0(model_output, sample, "v_prediction", level), expected, rtol=1e-5, atol=1e-5
        )
        scheduler.step(model_output, t, sample)


def test_flow_match_scheduler_level_and_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    assert scheduler_prediction_type(scheduler) == "flow_prediction"
    x0, noise = _tensors(seed=4)
    for i, t in enumerate(scheduler.timesteps):
        level = noise_level(scheduler, t)  # step_index is None before the first step
        sigma = float(scheduler.sigmas[i])
        assert level.is_flow and level.sigma == pytest.approx(sigma)
        assert level.sigma == pytest.approx(float(t) / 1000, abs=1e-6)
        x_t = (1 - sigma) * x0 + sigma * noise
        torch.testing.assert_close(to_x0(noise - x0, x_t, "flow", level), x0, rtol=1e-4, atol=1e-4)
        # Euler flow step from sigma to sigma_next with the exact velocity lands on the path
        x_next = scheduler.step(noise - x0, t, x_t).prev_sample
        sigma_next = float(scheduler.sigmas[i + 1])
        torch.testing.assert_close(x_next, (1 - sigma_next) * x0 + sigma_next * noise, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_dtype(dtype):
    x0, eps = _tensors()
    level = NoiseLevel.ddpm(0.05)
    x_t, targets = _forward(level, x0, eps)
    out = to_x0(targets["epsilon"].to(dtype), x_t.to(dtype), "epsilon", level)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), x0, rtol=5e-2, atol=0.2)


def test_prediction_type_aliases():
    assert [normalize_prediction_type(name) for name in ("eps", "v", "x0", "flow")] == list(PREDICTION_TYPES)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p, x: to_x0(p, x, "noise", NoiseLevel.ddpm(0.5)), "prediction_type"),
        (lambda p, x: to_x0(p, x, "epsilon", None), "noise_level"),
        (lambda p, x: to_x0(p, x, "flow_prediction", NoiseLevel.ddpm(0.5)), "flow"),
        (lambda p, x: to_x0(p, x, "v_prediction", NoiseLevel.flow_matching(0.5)), "flow_prediction"),
        (lambda p, x: to_x0(p, x, "epsilon", NoiseLevel.flow_matching(1.0)), "alpha = 0"),
        (lambda p, x: from_x0(p, x, "epsilon", NoiseLevel.ddpm(1.0)), "sigma = 0"),
        (lambda p, x: from_x0(p, x, "flow", NoiseLevel.flow_matching(0.0)), "sigma = 0"),
        (lambda p, x: to_x0(p, x[:1], "epsilon", NoiseLevel.ddpm(0.5)), "shape"),
        (lambda p, x: NoiseLevel.ddpm(1.5), "alpha_cumprod"),
        (lambda p, x: NoiseLevel.flow_matching(-0.1), "sigma"),
        (lambda p, x: NoiseLevel.karras(float("inf")), "sigma"),
        (lambda p, x: noise_level(object()), "noise level"),
        (lambda p, x: noise_level(DDIMScheduler()), "timestep"),
        (lambda p, x: noise_level(DDIMScheduler(), 1000.5), "timestep"),
    ],
)
def test_bad_input(call, message):
    pred, sample = _tensors()
    with pytest.raises(ValueError, match=message):
        call(pred, sample)


def test_wrong_types_raise_type_error():
    pred, sample = _tensors()
    with pytest.raises(TypeError, match="noise_level"):
        to_x0(pred, sample, "epsilon", 0.5)
    with pytest.raises(TypeError, match="sample"):
        to_x0(pred, sample.numpy(), "epsilon", NoiseLevel.ddpm(0.5))
    with pytest.raises(TypeError, match="is_flow"):
        NoiseLevel(0.5, 0.5, is_flow=1)


# ---------------------------------------------------------------------------------------- contracts (issue 11)


@pytest.mark.parametrize(
    ("make", "error", "argument"),
    [
        (lambda: NoiseLevel(float("nan"), 0.5), ValueError, "alpha"),
        (lambda: NoiseLevel(0.5, float("inf")), ValueError, "sigma"),
        (lambda: NoiseLevel(0.5, -0.1), ValueError, "sigma"),
        (lambda: NoiseLevel("0.5", 0.5), TypeError, "alpha"),
        (lambda: NoiseLevel(torch.tensor([0.5, float("nan")]), 0.5), ValueError, "alpha"),
        (lambda: NoiseLevel(torch.ones(2, 3), 0.5), ValueError, "alpha"),
        (lambda: NoiseLevel.ddpm(float("nan")), ValueError, "alpha_cumprod"),
        (lambda: NoiseLevel.flow_matching(torch.tensor([0.5, 1.5])), ValueError, "sigma"),
    ],
)
def test_noise_levels_are_validated(make, error, argument):
    with pytest.raises(error, match=argument):
        make()


def test_per_sample_levels_must_match_the_batch():
    pred, sample = _tensors()
    with pytest.raises(ValueError, match="3 values for a batch of 2"):
        to_x0(pred, sample, "epsilon", NoiseLevel.ddpm(torch.tensor([0.5, 0.4, 0.3])))


def test_half_precision_conversions_stay_finite_where_representable():
    x0 = torch.full((1, 4), 100.0, dtype=torch.float16)
    level = NoiseLevel.ddpm(1e-6)  # alpha = 1e-3: eps -> x0 divides by it
    sample = (level.alpha * x0.float() + level.sigma * 0.5).half()
    eps = from_x0(x0, sample, "epsilon", level)
    back = to_x0(eps, sample, "epsilon", level)
    assert back.dtype == torch.float16 and torch.isfinite(back).all()
    torch.testing.assert_close(back.float(), x0.float(), rtol=2e-2, atol=1.0)


def test_inputs_are_not_modified():
    pred, sample = _tensors()
    before = pred.clone(), sample.clone()
    convert(pred, sample, "epsilon", "v_prediction", NoiseLevel.ddpm(0.4))
    assert torch.equal(pred, before[0]) and torch.equal(sample, before[1])
