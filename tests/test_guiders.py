"""guidance.guiders (the contract the diffusers adapters drive) and the schedules added for diffusion."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
)
from diffusers.utils import logging as diffusers_logging
from scipy.stats import beta as beta_distribution

from guidance import ops
from guidance.guiders import APG, CFG, BetaCFG, CFGZeroStar, Guider, PerpNeg, RescaledCFG, guide
from guidance.schedules import (
    DYNAMIC_THRESHOLDING_MODES,
    Constant,
    DynamicThresholdingSchedule,
    Interval,
    Linear,
    as_schedule,
)
from guidance.spaces import NoiseLevel, from_x0, to_x0

diffusers_logging.set_verbosity_error()


def _pair(seed=0, shape=(2, 4, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(shape, generator=gen)
    return cond, 0.8 * cond + 0.3 * torch.randn(shape, generator=gen)


def _all_guiders() -> dict[str, Guider]:
    return {
        "cfg": CFG(5.0),
        "rescaled_cfg": RescaledCFG(5.0),
        "apg": APG(5.0, momentum=-0.5, norm_threshold=2.0),
        "apg_diffusers": APG(5.0, eta=1.0, convention="diffusers"),
        "cfg_zero_star": CFGZeroStar(5.0),
        "perp_neg": PerpNeg(5.0),
        "beta_cfg": BetaCFG(5.0),
    }


def _extra(name, cond):
    return {"negative": torch.zeros_like(cond)} if name == "perp_neg" else {}


# ---------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", sorted(_all_guiders()))
def test_guidance_off_returns_cond_itself_and_needs_no_uncond(name):
    guider = _all_guiders()[name]
    guider.schedule = Constant(1.0)
    cond, _ = _pair()
    guider.reset()
    assert guider.scale_at(0, 10) == 1.0
    assert guider.needs_uncond(0, 10) is False
    assert guider(cond, None, step=0, num_steps=10, **_extra(name, cond)) is cond


@pytest.mark.parametrize("name", sorted(_all_guiders()))
def test_guidance_on_needs_uncond_and_changes_the_prediction(name):
    guider = _all_guiders()[name]
    cond, uncond = _pair()
    guider.reset()
    step = 3  # beta-CFG's weight is 0 at the ends
    assert guider.needs_uncond(step, 10)
    out = guider(cond, uncond, step=step, num_steps=10, **_extra(name, cond))
    assert out.shape == cond.shape and torch.isfinite(out).all()
    assert not torch.equal(out, cond)
    with pytest.raises(ValueError, match="uncond"):
        guider(cond, None, step=step, num_steps=10, **_extra(name, cond))


def test_a_number_becomes_a_constant_schedule():
    assert CFG(7.5).schedule == Constant(7.5)
    assert CFG(7.5).scale_at(3) == 7.5


def test_schedule_drives_the_scale_and_the_uncond_skips():
    guider = CFG(Linear(start=1.0, end=5.0))
    cond, uncond = _pair()
    assert [guider.needs_uncond(i, 5) for i in range(5)] == [False, True, True, True, True]
    assert guider(cond, None, step=0, num_steps=5) is cond
    torch.testing.assert_close(guider(cond, uncond, step=4, num_steps=5), ops.cfg(cond, uncond, 5.0))


def test_interval_schedule_uses_sigma():
    guider = CFG(Interval(4.0, sigma_lo=0.3, sigma_hi=5.0))
    assert not guider.needs_uncond(0, 10, sigma=14.6)
    assert guider.needs_uncond(1, 10, sigma=2.0)
    assert not guider.needs_uncond(9, 10, sigma=0.1)


def test_cfg_guider_equals_diffusers_classifier_free_guidance():
    reference = ClassifierFreeGuidance(guidance_scale=6.0, guidance_rescale=0.5)
    guider = CFG(6.0, rescale=0.5)
    for step in range(3):
        cond, uncond = _pair(seed=step)
        reference.set_state(step=step, num_inference_steps=3, timestep=torch.tensor(999 - step))
        assert torch.equal(guider(cond, uncond, step=step, num_steps=3), reference.forward(cond, uncond).pred)


def test_rescaled_cfg_default_phi():
    cond, uncond = _pair()
    torch.testing.assert_close(
        RescaledCFG(7.0)(cond, uncond, step=0), ops.rescale(ops.cfg(cond, uncond, 7.0), cond, 0.7)
    )


@pytest.mark.parametrize("momentum", [None, -0.5, 0.5])
@pytest.mark.parametrize("norm_threshold", [None, 15.0, 1.0])
def test_apg_guider_diffusers_convention_equals_diffusers_guider(momentum, norm_threshold):
    reference = AdaptiveProjectedGuidance(
        guidance_scale=7.5,
        adaptive_projected_guidance_momentum=momentum,
        adaptive_projected_guidance_rescale=norm_threshold or 0.0,
        eta=1.0,
    )
    guider = APG(7.5, eta=1.0, momentum=momentum, norm_threshold=norm_threshold, convention="diffusers")
    assert guider.space == "prediction"
    for run in range(2):  # the second run checks that both reset their momentum at step 0
        guider.reset()
        for step in range(4):
            cond, uncond = _pair(seed=step + 7 * run)
            reference.set_state(step=step, num_inference_steps=4, timestep=torch.tensor(999 - step))
            reference.prepare_inputs(
                {"embeds": (cond, uncond)}
            )  # creates diffusers' momentum buffer at step 0
            expected = reference.forward(cond, uncond).pred
            assert torch.equal(guider(cond, uncond, step=step, num_steps=4), expected), (run, step)


def test_apg_momentum_resets_explicitly_and_when_steps_restart():
    guider = APG(5.0, momentum=-0.5)
    pairs = [_pair(seed=s) for s in range(3)]
    first = [guider(c, u, step=i, num_steps=3) for i, (c, u) in enumerate(pairs)]
    second = [guider(c, u, step=i, num_steps=3) for i, (c, u) in enumerate(pairs)]  # step went back to 0
    guider.reset()
    third = [guider(c, u, step=i, num_steps=3) for i, (c, u) in enumerate(pairs)]
    for a, b, c in zip(first, second, third, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    no_momentum = APG(5.0)(*pairs[1], step=1, num_steps=3)
    assert not torch.equal(first[1], no_momentum)  # momentum did something


def test_apg_paper_form_acts_on_x0_through_guide():
    guider = APG(6.0, eta=0.2, norm_threshold=3.0)
    assert guider.space == "x0"
    level = NoiseLevel.ddpm(0.4)
    sample, _ = _pair(seed=9)
    for prediction_type in ("epsilon", "v_prediction"):
        cond, uncond = _pair()
        out = guide(
            guider,
            cond,
            uncond,
            step=0,
            num_steps=4,
            sample=sample,
            prediction_type=prediction_type,
            noise_level=level,
        )
        x0_cond, x0_uncond = (to_x0(p, sample, prediction_type, level) for p in (cond, uncond))
        x0_guided = ops.apg(x0_cond, x0_uncond, 6.0, eta=0.2, norm_threshold=3.0)
        torch.testing.assert_close(out, from_x0(x0_guided, sample, prediction_type, level))


def test_guide_skips_conversions_when_guidance_is_off_and_needs_state_when_on():
    cond, uncond = _pair()
    guider = APG(Linear(1.0, 5.0))
    assert guide(guider, cond, None, step=0, num_steps=3) is cond
    with pytest.raises(ValueError, match="noise_level"):
        guide(guider, cond, uncond, step=2, num_steps=3)
    flow = NoiseLevel.flow_matching(0.5)
    out = guide(
        guider, cond, uncond, step=2, num_steps=3, sample=cond, prediction_type="flow", noise_level=flow
    )
    assert torch.isfinite(out).all()
    x0 = guide(guider, cond, uncond, step=2, num_steps=3, sample=cond, prediction_type="x0", noise_level=flow)
    torch.testing.assert_close(x0, ops.apg(cond, uncond, 5.0))


@pytest.mark.parametrize("zero_init_steps", [0, 1, 2])
def test_cfg_zero_star_guider_equals_diffusers_guider(zero_init_steps):
    reference = ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=zero_init_steps)
    guider = CFGZeroStar(5.0, zero_init_steps=zero_init_steps)
    for step in range(4):
        cond, uncond = _pair(seed=step)
        reference.set_state(step=step, num_inference_steps=4, timestep=torch.tensor(999 - step))
        expected = reference.forward(cond, uncond).pred
        assert guider.needs_uncond(step, 4) == (step >= zero_init_steps)
        uncond_in = uncond if guider.needs_uncond(step, 4) else None
        assert torch.equal(guider(cond, uncond_in, step=step, num_steps=4), expected)


def test_cfg_zero_star_without_zero_star_is_cfg_with_zero_init():
    guider = CFGZeroStar(4.0, zero_init_steps=1, use_zero_star=False)
    cond, uncond = _pair()
    assert torch.equal(guider(cond, None, step=0), torch.zeros_like(cond))
    assert torch.equal(guider(cond, uncond, step=1), ops.cfg(cond, uncond, 4.0))


def test_perp_neg_guider_needs_negative():
    guider = PerpNeg(5.0, neg_scale=0.5)
    assert guider.needs_negative
    cond, uncond = _pair()
    negative, _ = _pair(seed=5)
    torch.testing.assert_close(
        guider(cond, uncond, negative=negative, step=0), ops.perp_neg(cond, uncond, negative, 5.0, 0.5)
    )
    with pytest.raises(ValueError, match="negative"):
        guider(cond, uncond, step=0)


def test_beta_cfg_guider_matches_authors_loop():
    # gmum/beta-CFG latent_diffusion.py, DDIM geo-beta solver: u + w * beta.pdf(step / (N - 1), a, b) * d / ||d||^gamma
    guider = BetaCFG(7.5, a=2.0, b=3.0, gamma=0.5)
    num_steps = 5
    for step in range(num_steps):
        cond, uncond = _pair(seed=step)
        diff = cond - uncond
        norm = torch.norm(diff, p=2, dim=(1, 2, 3)).reshape(-1, 1, 1, 1)
        weight = float(beta_distribution.pdf(step / (num_steps - 1), 2.0, 3.0))
        expected = uncond + 7.5 * (diff / norm**0.5 * weight)
        out = guider(cond, uncond, step=step, num_steps=num_steps)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_beta_cfg_takes_a_schedule():
    guider = BetaCFG(Constant(3.0), gamma=0.0)
    cond, uncond = _pair()
    torch.testing.assert_close(guider(cond, uncond, step=0), ops.cfg(cond, uncond, 3.0))


def test_repr_names_the_configuration():
    text = repr(APG(5.0, momentum=0.5, convention="comfyui"))
    assert "APG(" in text and "comfyui" in text and "momentum=0.5" in text


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: APG(5.0, convention="webui"), "convention"),
        (lambda: APG(5.0, eta=float("nan")), "eta"),
        (lambda: APG(5.0, momentum=3.0), "momentum"),
        (lambda: APG(5.0, momentum=-0.5, convention="comfyui"), "momentum"),
        (lambda: APG(5.0, norm_threshold=-2.0), "norm_threshold"),
        (lambda: APG(5.0, space="latent"), "space"),
        (lambda: RescaledCFG(5.0, rescale=2.0), "rescale"),
        (lambda: CFGZeroStar(5.0, zero_init_steps=-1), "zero_init_steps"),
        (lambda: PerpNeg(5.0, neg_scale=-1.0), "neg_scale"),
        (lambda: BetaCFG(5.0, gamma=-1.0), "gamma"),
        (lambda: BetaCFG(5.0, a=0.0), "a"),
        (lambda: CFG(float("inf")), "scale"),
    ],
)
def test_bad_configuration_raises_value_error(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


# ---------------------------------------------------------------------------------------- schedules


def _dynamic_thresholding_reference(scale, mode, minimum, sched_val, step, max_steps):
    """sd-dynamic-thresholding's DynThresh.interpret_scale (dynthres_core.py), transcribed."""
    scale -= minimum
    frac = step / (max_steps - 1)
    if mode == "Constant":
        pass
    elif mode == "Linear Down":
        scale *= 1.0 - frac
    elif mode == "Half Cosine Down":
        scale *= math.cos(frac)
    elif mode == "Cosine Down":
        scale *= math.cos(frac * 1.5707)
    elif mode == "Linear Up":
        scale *= frac
    elif mode == "Half Cosine Up":
        scale *= 1.0 - math.cos(frac)
    elif mode == "Cosine Up":
        scale *= 1.0 - math.cos(frac * 1.5707)
    elif mode == "Power Up":
        scale *= math.pow(frac, sched_val)
    elif mode == "Power Down":
        scale *= 1.0 - math.pow(frac, sched_val)
    elif mode == "Linear Repeating":
        portion = (frac * sched_val) % 1.0
        scale *= (0.5 - portion) * 2 if portion < 0.5 else (portion - 0.5) * 2
    elif mode == "Cosine Repeating":
        scale *= math.cos(frac * 6.28318 * sched_val) * 0.5 + 0.5
    elif mode == "Sawtooth":
        scale *= (frac * sched_val) % 1.0
    return scale + minimum


@pytest.mark.parametrize("mode", DYNAMIC_THRESHOLDING_MODES)
def test_dynamic_thresholding_modes_match_the_extension(mode):
    reference_mode = mode.title()
    schedule = DynamicThresholdingSchedule(7.0, reference_mode, minimum=0.0, value=3.0)
    for step in range(20):
        expected = _dynamic_thresholding_reference(7.0, reference_mode, 0.0, 3.0, step, 20)
        assert schedule(step, 20) == expected


def test_dynamic_thresholding_defaults_and_errors():
    schedule = DynamicThresholdingSchedule(5.0, "Power Up")
    assert schedule(0, 10) == 1.0 and schedule(9, 10) == 5.0  # minimum 1: starts with guidance off
    assert as_schedule(schedule) is schedule
    with pytest.raises(ValueError, match="mode"):
        DynamicThresholdingSchedule(5.0, "zigzag")
    with pytest.raises(ValueError, match="num_steps"):
        schedule(3)


def test_decreasing_linear_schedule():
    schedule = Linear(start=9.0, end=1.0)
    assert [schedule(i, 5) for i in range(5)] == [9.0, 7.0, 5.0, 3.0, 1.0]


# ---------------------------------------------------------------------------------------- contracts (issue 11)


@pytest.mark.parametrize(
    ("make", "error", "argument"),
    [
        (lambda: CFG(float("nan")), ValueError, "scale"),
        (lambda: CFG(True), TypeError, "guidance scale"),
        (lambda: CFG(2.0, dims=(0, 1)), ValueError, "dims"),
        (lambda: CFG(2.0, dims="x"), TypeError, "dims"),
        (lambda: APG(5.0, norm_threshold=float("inf")), ValueError, "norm_threshold"),
        (lambda: APG(5.0, eta="1"), TypeError, "eta"),
        (lambda: CFGZeroStar(5.0, zero_init_steps=1.5), TypeError, "zero_init_steps"),
        (lambda: CFGZeroStar(5.0, eps=float("nan")), ValueError, "eps"),
        (lambda: CFGZeroStar(5.0, use_zero_star="yes"), TypeError, "use_zero_star"),
        (lambda: PerpNeg(5.0, neg_scale=float("inf")), ValueError, "neg_scale"),
        (lambda: BetaCFG(5.0, a=float("inf")), ValueError, "`a`"),
        (lambda: BetaCFG(Constant(3.0), b=0.0), ValueError, "`b`"),
        (lambda: BetaCFG(5.0, gamma=float("inf")), ValueError, "gamma"),
    ],
)
def test_bad_settings_name_the_argument(make, error, argument):
    with pytest.raises(error, match=argument):
        make()


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"step": -1}, ValueError, "step"),
        ({"step": 1.5}, TypeError, "step"),
        ({"step": 0, "num_steps": 0}, ValueError, "num_steps"),
        ({"step": 0, "sigma": float("nan")}, ValueError, "sigma"),
    ],
)
def test_bad_call_arguments_name_the_argument(kwargs, error, argument):
    cond, uncond = _pair()
    with pytest.raises(error, match=argument):
        CFG(3.0)(cond, uncond, **kwargs)


def test_guider_lets_the_op_validate_tensors():
    cond, uncond = _pair()
    with pytest.raises(ValueError, match="same shape"):
        CFG(3.0)(cond, uncond[:1], step=0)
    with pytest.raises(TypeError, match="`negative` must be a torch.Tensor"):
        ops.perp_neg(cond, uncond, None, 3.0)
    with pytest.raises(ValueError, match="negative="):
        PerpNeg(3.0)(cond, uncond, step=0)


def test_zero_init_rule_has_one_home():
    from guidance.ops.zero_star import zero_init

    guider = CFGZeroStar(3.0, zero_init_steps=2)
    assert [guider.in_zero_init(step) for step in range(4)] == [zero_init(step, 2) for step in range(4)]
    assert [zero_init(step, 2) for step in range(4)] == [True, True, False, False]
    with pytest.raises(ValueError, match="step"):
        zero_init(-1, 2)


def test_guiders_in_half_precision_stay_finite():
    cond = torch.full((1, 4, 4, 4), 6e4, dtype=torch.float16)
    uncond = -cond
    for name, guider in _all_guiders().items():
        out = guider(cond, uncond, step=1, num_steps=3, **_extra(name, cond))
        assert not torch.isnan(out).any(), name
