"""Guidance-weight schedules shared by the LM and diffusion paths."""

from __future__ import annotations

import math

import pytest

from guidance.schedules import (
    BetaPdf,
    Constant,
    Cosine,
    Cutoff,
    FunctionSchedule,
    Interval,
    Linear,
    MeanNormalized,
    Window,
    as_schedule,
)


def test_linear_and_cosine_ramps_hit_their_ends():
    for ramp in (Linear(1.0, 5.0), Cosine(1.0, 5.0)):
        values = [ramp(i, 9) for i in range(9)]
        assert values[0] == 1.0 and values[-1] == 5.0
        assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert Cosine(1.0, 5.0)(4, 9) == pytest.approx(3.0)
    assert Linear(5.0, 1.0)(2, 5) == pytest.approx(3.0)  # decreasing works too


def test_window_interval_and_cutoff_switch_guidance_off_with_exactly_one():
    window = Window(4.0, start_step=2, end_step=5)
    assert [window(i) for i in range(7)] == [1.0, 1.0, 4.0, 4.0, 4.0, 1.0, 1.0]
    interval = Interval(3.0, sigma_lo=0.3, sigma_hi=5.0)
    assert [interval(0, sigma=s) for s in (10.0, 5.0, 1.0, 0.3, 0.1)] == [1.0, 3.0, 3.0, 1.0, 1.0]
    cutoff = Cutoff(7.5, fraction=0.4)
    assert [cutoff(i, 10) for i in range(10)] == [7.5] * 4 + [1.0] * 6


def test_beta_pdf_weights():
    beta = BetaPdf(7.5, a=2.0, b=3.0)
    # beta(2, 3) pdf = 12 t (1 - t)^2
    assert beta(2, 5) == pytest.approx(7.5 * 12 * 0.5 * 0.25)
    assert beta(0, 5) == 0.0 and beta(4, 5) == 0.0


def test_mean_normalized_hits_the_target_mean_and_keeps_off_steps_off():
    ramp = MeanNormalized(Linear(1.0, 9.0), target_mean=3.0)
    values = [ramp(i, 20) for i in range(20)]
    assert sum(values) / 20 == pytest.approx(3.0)
    assert values[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mean scale is 1"):
        MeanNormalized(Constant(1.0), 2.0)(0, 4)


def test_user_callables_of_any_arity():
    assert as_schedule(lambda step: 2.0 + step)(3) == 5.0
    assert as_schedule(lambda step, n: step / n)(1, 4) == 0.25
    assert as_schedule(lambda step, n, sigma: sigma)(0, 4, 0.5) == 0.5
    assert isinstance(as_schedule(2), Constant) and as_schedule(2)(0) == 2.0
    with pytest.raises(ValueError, match="finite"):
        FunctionSchedule(lambda step: math.nan)(0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Constant(math.inf), "scale"),
        (lambda: Window(2.0, start_step=3, end_step=1), "end_step"),
        (lambda: Interval(2.0, sigma_lo=2.0, sigma_hi=1.0), "sigma_hi"),
        (lambda: Cutoff(2.0, fraction=1.5), "fraction"),
        (lambda: BetaPdf(2.0, a=0.0), "a"),
        (lambda: Linear(1.0, 2.0)(0), "num_steps"),
        (lambda: Interval(2.0, 0.1)(0), "sigma"),
    ],
)
def test_bad_schedules_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("bad", ["fast", True, None, [1.0]])
def test_as_schedule_rejects_wrong_types(bad):
    with pytest.raises(TypeError, match="Schedule or a callable"):
        as_schedule(bad)


# ---------------------------------------------------------------------------------------- contracts (issue 11)


@pytest.mark.parametrize(
    ("call", "error", "argument"),
    [
        (lambda: Linear(1, 3)(math.nan, 5), TypeError, "step"),
        (lambda: Linear(1, 3)(2.0, 5), TypeError, "step"),
        (lambda: Linear(1, 3)(-1, 5), ValueError, "step"),
        (lambda: Linear(1, 3)(1, 0), ValueError, "num_steps"),
        (lambda: Constant(2.0)(0, sigma=math.nan), ValueError, "sigma"),
        (lambda: Interval(2.0, 0.1)(0, None, sigma=math.nan), ValueError, "sigma"),
        (lambda: Interval(2.0, 0.1)(0, None, sigma=-1.0), ValueError, "sigma"),
        (lambda: Interval(2.0, math.nan), ValueError, "sigma_lo"),
        (lambda: BetaPdf(7.5, a=math.inf), ValueError, "`a`"),
        (lambda: BetaPdf(7.5, b=0.5), ValueError, "`b`"),
        (lambda: BetaPdf(7.5, a="2"), TypeError, "`a`"),
        (lambda: Window(2.0, start_step=1.5), TypeError, "start_step"),
        (lambda: Cutoff(2.0, math.nan), ValueError, "fraction"),
        (lambda: FunctionSchedule(3.0), TypeError, "fn"),
        (lambda: MeanNormalized(Linear(1, 3), math.inf), ValueError, "target_mean"),
    ],
)
def test_bad_arguments_name_the_argument(call, error, argument):
    with pytest.raises(error, match=argument):
        call()


def test_extreme_settings_stay_finite():
    from guidance.schedules import DynamicThresholdingSchedule

    sched = DynamicThresholdingSchedule(7.5, "power up", 1, 1e308)
    assert [sched(step, 5) for step in range(7)] == [1.0, 1.0, 1.0, 1.0, 7.5, 7.5, 7.5]  # past the end: last value
    assert Linear(-1e308, 1e308)(1, 3) == 0.0  # end - start overflows; the exact midpoint does not
    assert BetaPdf(1e300, a=1e6, b=1e6)(1, 3) == pytest.approx(1e300 * 2 * math.sqrt(1e6 / math.pi), rel=1e-4)
    with pytest.raises(ValueError, match="out of the float range"):
        BetaPdf(1e308, a=10.0, b=10.0)(1, 3)  # pdf(0.5) = 3.5: the product exceeds the float range
    with pytest.raises(ValueError, match="value"):
        DynamicThresholdingSchedule(7.5, "cosine repeating", 1, 1e308)


def test_numpy_and_tensor_integers_are_steps():
    import numpy as np
    import torch

    assert Linear(1, 3)(np.int64(1), np.int32(3)) == 2.0
    assert Linear(1, 3)(torch.tensor(1), 3) == 2.0
