"""Guidance-weight schedules shared by the language-model and diffusion paths.

A schedule maps ``(step, num_steps, sigma)`` to a guidance scale in the convention of
:mod:`guidance.ops` (``1.0`` is guidance off). ``step`` counts from 0; ``num_steps`` is the
total number of steps when known (sampling steps for diffusion, ``max_new_tokens`` for a
language model) and ``sigma`` the current noise level when known (diffusion only).

A schedule that returns exactly ``1.0`` at a step turns guidance off there, and callers
that can (adaptive LM decoding, the diffusion wrapper) then skip the unconditional
evaluation entirely.

Contract of every schedule here: the constructor validates its settings (``ValueError`` naming
the argument and its range, ``TypeError`` for a wrong type); a call validates ``step`` (an integer
``>= 0``), ``num_steps`` (``None`` or an integer ``>= 1``) and ``sigma`` (``None`` or a number
``>= 0``, NaN refused) and returns a finite Python ``float`` or raises ``ValueError``. Steps past
``num_steps - 1`` get the value of the last step. See ``docs/methods.md`` ("Guidance schedules").

Example:
    >>> from guidance.schedules import Linear, as_schedule
    >>> sched = Linear(start=1.0, end=3.0)
    >>> [sched(step, 5) for step in range(5)]
    [1.0, 1.5, 2.0, 2.5, 3.0]
    >>> as_schedule(1.5)(7)
    1.5
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from guidance.validation import (
    check_choice,
    check_finite,
    check_int,
    check_optional_int,
    check_range,
    is_real_number,
)

__all__ = [
    "Schedule",
    "Constant",
    "Linear",
    "Cosine",
    "Window",
    "Interval",
    "BetaPdf",
    "Cutoff",
    "FunctionSchedule",
    "MeanNormalized",
    "DynamicThresholdingSchedule",
    "DYNAMIC_THRESHOLDING_MODES",
    "as_schedule",
    "progress",
    "check_call",
    "check_beta_shape",
]


@runtime_checkable
class Schedule(Protocol):
    """Anything callable as ``schedule(step, num_steps=None, sigma=None) -> float``.

    Arguments of a call: ``step`` (int, ``>= 0``), ``num_steps`` (int ``>= 1`` or ``None``), ``sigma``
    (float ``>= 0`` or ``None``); the result is the guidance scale, a finite float.

    Example:
        >>> from guidance.schedules import Linear, Schedule
        >>> isinstance(Linear(1.0, 2.0), Schedule)
        True
    """

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float: ...


def check_call(step: Any, num_steps: Any = None, sigma: Any = None) -> tuple[int, int | None, float | None]:
    """The arguments of a schedule call: ``step`` an integer ``>= 0``, ``num_steps`` ``None`` or an
    integer ``>= 1``, ``sigma`` ``None`` or a number in ``[0, inf]``. Returns them normalised.

    Example:
        >>> from guidance.schedules import check_call
        >>> check_call(3, 10, 0.5)
        (3, 10, 0.5)
    """
    step = check_int(step, "step", minimum=0)
    num_steps = check_optional_int(num_steps, "num_steps", minimum=1)
    if sigma is not None:
        sigma = check_range(sigma, "sigma", 0.0, math.inf)
    return step, num_steps, sigma


def _set(obj: Any, **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def _lerp(a: float, b: float, t: float) -> float:
    """``a + (b - a) t`` (the reference order); ``a (1 - t) + b t`` where ``b - a`` overflows."""
    value = a + (b - a) * t
    return value if math.isfinite(value) else a * (1.0 - t) + b * t


def _result(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}: out of the float range for these settings.")
    return value


def progress(step: int, num_steps: int | None, schedule_name: str) -> float:
    """Fraction of sampling done, ``step / (num_steps - 1)`` clamped to ``[0, 1]`` (``1.0`` for one step).

    Args:
        step (int): the step, an integer ``>= 0``.
        num_steps (int | None): total number of steps, an integer ``>= 1`` (``ValueError`` for ``None``).
        schedule_name (str): the schedule's name for the error message.

    Example:
        >>> from guidance.schedules import progress
        >>> progress(1, 5, "linear"), progress(9, 5, "linear")
        (0.25, 1.0)
    """
    step, num_steps, _ = check_call(step, num_steps)
    if num_steps is None:
        raise ValueError(
            f"The {schedule_name} schedule needs `num_steps` (the total number of steps or new tokens)."
        )
    if num_steps == 1:
        return 1.0
    return min(step / (num_steps - 1), 1.0)


@dataclass(frozen=True)
class Constant:
    """The same scale at every step.

    Args:
        scale (float): the guidance scale, a finite number.

    Example:
        >>> from guidance.schedules import Constant
        >>> Constant(2.5)(7)
        2.5
    """

    scale: float

    def __post_init__(self) -> None:
        _set(self, scale=check_finite(self.scale, "scale"))

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        check_call(step, num_steps, sigma)
        return self.scale


@dataclass(frozen=True)
class Linear:
    """Linear ramp from ``start`` (first step) to ``end`` (last step): ``start + (end - start) t``.

    Increasing ramps (``start < end``: low guidance at high noise, high near the end) are
    what Wang et al. (TMLR 2024) found to beat a constant scale at equal mean.

    Args:
        start (float): the scale at the first step, a finite number.
        end (float): the scale at the last step, a finite number.

    Example:
        >>> from guidance.schedules import Linear
        >>> [Linear(1.0, 3.0)(step, 3) for step in range(3)]
        [1.0, 2.0, 3.0]
    """

    start: float
    end: float

    def __post_init__(self) -> None:
        _set(self, start=check_finite(self.start, "start"), end=check_finite(self.end, "end"))

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        check_call(step, num_steps, sigma)
        return _lerp(self.start, self.end, progress(step, num_steps, "linear"))


@dataclass(frozen=True)
class Cosine:
    """Half-cosine ramp ``start + (end - start) * (1 - cos(pi t)) / 2``.

    Args:
        start (float): the scale at the first step, a finite number.
        end (float): the scale at the last step, a finite number.

    Example:
        >>> from guidance.schedules import Cosine
        >>> [Cosine(1.0, 3.0)(step, 3) for step in range(3)]
        [1.0, 2.0, 3.0]
    """

    start: float
    end: float

    def __post_init__(self) -> None:
        _set(self, start=check_finite(self.start, "start"), end=check_finite(self.end, "end"))

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        check_call(step, num_steps, sigma)
        t = progress(step, num_steps, "cosine")
        return _lerp(self.start, self.end, (1.0 - math.cos(math.pi * t)) / 2.0)


@dataclass(frozen=True)
class Window:
    """``scale`` for steps in ``[start_step, end_step)``, ``off_scale`` (default 1: off) elsewhere.

    Args:
        scale (float): the scale inside the window, a finite number.
        start_step (int): first guided step, an integer ``>= 0``.
        end_step (int | None): first step after the window, an integer ``>= start_step``; ``None``:
            until the end.
        off_scale (float): the scale outside the window, a finite number (1: guidance off).

    Example:
        >>> from guidance.schedules import Window
        >>> [Window(3.0, 1, 3)(step) for step in range(4)]
        [1.0, 3.0, 3.0, 1.0]
    """

    scale: float
    start_step: int = 0
    end_step: int | None = None
    off_scale: float = 1.0

    def __post_init__(self) -> None:
        start = check_int(self.start_step, "start_step", minimum=0)
        end = check_optional_int(self.end_step, "end_step", minimum=start)
        _set(
            self,
            scale=check_finite(self.scale, "scale"),
            off_scale=check_finite(self.off_scale, "off_scale"),
            start_step=start,
            end_step=end,
        )

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        step, _, _ = check_call(step, num_steps, sigma)
        inside = step >= self.start_step and (self.end_step is None or step < self.end_step)
        return self.scale if inside else self.off_scale


@dataclass(frozen=True)
class Interval:
    """Guidance interval (Kynkaanniemi et al. 2024): ``scale`` for ``sigma_lo < sigma <= sigma_hi``, else 1.

    Outside the interval the conditional prediction is used alone, and the
    unconditional evaluation can be skipped.

    Args:
        scale (float): the scale inside the interval, a finite number.
        sigma_lo (float): lower end (excluded), a finite number ``>= 0``.
        sigma_hi (float): upper end (included), a number ``> sigma_lo`` (``inf`` allowed).

    Example:
        >>> from guidance.schedules import Interval
        >>> [Interval(3.0, 0.5, 2.0)(0, sigma=s) for s in (0.5, 1.0, 2.0, 5.0)]
        [1.0, 3.0, 3.0, 1.0]
    """

    scale: float
    sigma_lo: float
    sigma_hi: float = math.inf

    def __post_init__(self) -> None:
        lo = check_range(self.sigma_lo, "sigma_lo", 0.0, math.inf, hi_open=True)
        hi = check_range(self.sigma_hi, "sigma_hi", lo, math.inf, lo_open=True)
        _set(self, scale=check_finite(self.scale, "scale"), sigma_lo=lo, sigma_hi=hi)

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        _, _, sigma = check_call(step, num_steps, sigma)
        if sigma is None:
            raise ValueError("The interval schedule needs `sigma`, the current noise level.")
        return self.scale if self.sigma_lo < sigma <= self.sigma_hi else 1.0


_MAX_BETA_SHAPE = 1e6


def check_beta_shape(a: Any, b: Any) -> tuple[float, float]:
    """beta-CFG's shape parameters: numbers in ``[1, 1e6]``. Below 1 the weight is infinite at the
    first or last step, which every run visits; above ``1e6`` the pdf cannot be computed accurately
    in double precision (its log is a difference of huge ``lgamma`` values).

    Example:
        >>> from guidance.schedules import check_beta_shape
        >>> check_beta_shape(2, 3)
        (2.0, 3.0)
    """
    return (
        check_range(a, "a", 1.0, _MAX_BETA_SHAPE),
        check_range(b, "b", 1.0, _MAX_BETA_SHAPE),
    )


@dataclass(frozen=True)
class BetaPdf:
    """beta-CFG's time weighting (Malarz et al.): ``scale * beta_pdf(t; a, b)``, ``t = step / (N - 1)``.

    The norm scaling part of beta-CFG is an operator (:func:`guidance.ops.beta_cfg`);
    this is the schedule it is paired with. Paper example: ``scale=7.5, a=2, b=3``.

    Args:
        scale (float): the weight multiplying the pdf, a finite number.
        a (float): first shape parameter, in ``[1, 1e6]``.
        b (float): second shape parameter, in ``[1, 1e6]``.

    A call raises ``ValueError`` where ``scale * beta_pdf`` exceeds the float range (huge ``a``, ``b``).

    Example:
        >>> from guidance.schedules import BetaPdf
        >>> [round(BetaPdf(7.5)(step, 3), 4) for step in range(3)]
        [0.0, 11.25, 0.0]
    """

    scale: float
    a: float = 2.0
    b: float = 3.0

    def __post_init__(self) -> None:
        a, b = check_beta_shape(self.a, self.b)
        _set(self, scale=check_finite(self.scale, "scale"), a=a, b=b)

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        check_call(step, num_steps, sigma)
        t = progress(step, num_steps, "beta")
        if (t == 0.0 and self.a > 1) or (t == 1.0 and self.b > 1) or self.scale == 0.0:
            return 0.0
        log_norm = math.lgamma(self.a) + math.lgamma(self.b) - math.lgamma(self.a + self.b)
        log_pdf = (self.a - 1) * _safe_log(t) + (self.b - 1) * _safe_log(1 - t) - log_norm
        try:
            value = self.scale * math.exp(log_pdf)
        except OverflowError:  # the pdf alone overflows; the product may not
            value = math.copysign(math.exp(min(math.log(abs(self.scale)) + log_pdf, 710.0)), self.scale)
        return _result(value, "scale * beta_pdf(t)")


def _safe_log(x: float) -> float:
    return math.log(x) if x > 0 else 0.0


@dataclass(frozen=True)
class Cutoff:
    """``scale`` for the first ``fraction`` of the steps (``step < int(num_steps * fraction)``), then 1.

    The schedule form of diffusers' ``SDCFGCutoffCallback(cutoff_step_ratio=...)``, correct for any batch size.

    Args:
        scale (float): the scale before the cut-off, a finite number.
        fraction (float): the guided fraction of the steps, in ``[0, 1]``.

    Example:
        >>> from guidance.schedules import Cutoff
        >>> [Cutoff(3.0, 0.5)(step, 4) for step in range(4)]
        [3.0, 3.0, 1.0, 1.0]
    """

    scale: float
    fraction: float

    def __post_init__(self) -> None:
        _set(self, scale=check_finite(self.scale, "scale"), fraction=check_range(self.fraction, "fraction", 0.0, 1.0))

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        step, num_steps, _ = check_call(step, num_steps, sigma)
        if num_steps is None:
            raise ValueError("The cutoff schedule needs `num_steps`.")
        return self.scale if step < int(num_steps * self.fraction) else 1.0


@dataclass(frozen=True)
class FunctionSchedule:
    """Wraps a user callable. It may take ``(step)``, ``(step, num_steps)`` or ``(step, num_steps, sigma)``.

    Args:
        fn (Callable[..., float]): the callable; it must return a finite real number
            (``ValueError`` otherwise, ``TypeError`` for a non-number).
        arity (int): how many of ``(step, num_steps, sigma)`` to pass; inferred from ``fn``'s signature.

    Example:
        >>> from guidance.schedules import FunctionSchedule
        >>> FunctionSchedule(lambda step: 1.0 + step)(2)
        3.0
    """

    fn: Callable[..., float]
    arity: int = field(default=3, compare=False)

    def __post_init__(self) -> None:
        import inspect

        if not callable(self.fn):
            raise TypeError(f"`fn` must be callable, got {type(self.fn).__name__}.")
        _set(self, arity=check_int(self.arity, "arity", 1, 3))
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):
            return
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            return
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        _set(self, arity=max(1, min(3, len(positional))))

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        args = check_call(step, num_steps, sigma)[: self.arity]
        return check_finite(self.fn(*args), "schedule(step)")


@dataclass
class MeanNormalized:
    """Rescales ``schedule`` so that its mean over ``num_steps`` steps is ``target_mean``.

    The guidance part ``w - 1`` is multiplied by ``(target_mean - 1) / (mean - 1)``, so
    steps where the base schedule is off (``w = 1``) stay off. Use it to compare
    schedules at equal mean scale, as Wang et al. do. A call raises ``ValueError`` for a
    schedule whose mean over ``num_steps`` is 1 (nothing to rescale).

    Args:
        schedule (Schedule): the schedule to rescale (any schedule callable).
        target_mean (float): the wanted mean scale, a finite number.

    Example:
        >>> from guidance.schedules import Linear, MeanNormalized
        >>> sched = MeanNormalized(Linear(1.0, 3.0), target_mean=3.0)
        >>> [sched(step, 3) for step in range(3)]
        [1.0, 3.0, 5.0]
    """

    schedule: Schedule
    target_mean: float
    _cache: dict[int, float] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.schedule):
            raise TypeError(f"`schedule` must be a schedule (a callable), got {type(self.schedule).__name__}.")
        self.target_mean = check_finite(self.target_mean, "target_mean")

    def _factor(self, num_steps: int) -> float:
        if num_steps not in self._cache:
            mean = math.fsum(float(self.schedule(i, num_steps, None)) for i in range(num_steps)) / num_steps
            if abs(mean - 1.0) < 1e-12:
                raise ValueError("Cannot normalise a schedule whose mean scale is 1 (guidance off throughout).")
            self._cache[num_steps] = (self.target_mean - 1.0) / (mean - 1.0)
        return self._cache[num_steps]

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        step, num_steps, sigma = check_call(step, num_steps, sigma)
        if num_steps is None:
            raise ValueError("MeanNormalized needs `num_steps`.")
        value = 1.0 + (float(self.schedule(step, num_steps, sigma)) - 1.0) * self._factor(num_steps)
        return _result(value, "MeanNormalized's scale")


DYNAMIC_THRESHOLDING_MODES = (
    "constant",
    "linear down",
    "half cosine down",
    "cosine down",
    "linear up",
    "half cosine up",
    "cosine up",
    "power up",
    "power down",
    "linear repeating",
    "cosine repeating",
    "sawtooth",
)


def _dynamic_thresholding_factor(mode: str, t: float, v: float) -> float:
    if mode == "constant":
        return 1.0
    if mode in ("linear down", "linear up"):
        return 1.0 - t if mode == "linear down" else t
    if mode == "half cosine down":
        return math.cos(t)
    if mode == "cosine down":
        return math.cos(t * 1.5707)
    if mode == "half cosine up":
        return 1.0 - math.cos(t)
    if mode == "cosine up":
        return 1.0 - math.cos(t * 1.5707)
    if mode in ("power up", "power down"):
        return math.pow(t, v) if mode == "power up" else 1.0 - math.pow(t, v)
    if mode == "linear repeating":
        portion = (t * v) % 1.0
        return (0.5 - portion) * 2 if portion < 0.5 else (portion - 0.5) * 2
    if mode == "cosine repeating":
        return math.cos(t * 6.28318 * v) * 0.5 + 0.5
    return (t * v) % 1.0  # sawtooth


@dataclass(frozen=True)
class DynamicThresholdingSchedule:
    """The schedule modes of sd-dynamic-thresholding: ``minimum + (scale - minimum) * f(t)``, ``t = step / (N - 1)``.

    ``mode`` is one of :data:`DYNAMIC_THRESHOLDING_MODES` (case-insensitive, the extension's UI
    names): ``f`` is ``1 - t`` (linear down), ``cos(t)`` (half cosine down), ``cos(1.5707 t)``
    (cosine down), ``t``, ``1 - cos(t)``, ``1 - cos(1.5707 t)`` (the "up" forms), ``t^value`` /
    ``1 - t^value`` (power up / down), a triangle wave, ``cos(6.28318 t value) / 2 + 1/2`` and
    ``(t value) mod 1`` (linear repeating, cosine repeating, sawtooth; ``value`` cycles). The
    extension's truncated constants are kept so its numbers are reproduced exactly. Its default
    ``minimum`` is 0 (unconditional); ours is 1 (guidance off).

    Args:
        scale (float): the scale where ``f = 1``, a finite number.
        mode (str): one of :data:`DYNAMIC_THRESHOLDING_MODES` (any case).
        minimum (float): the scale where ``f = 0``, a finite number.
        value (float): the power (power modes, ``>= 0``) or the number of cycles (repeating modes,
            ``|6.28318 value|`` finite), a finite number.

    Example:
        >>> from guidance.schedules import DynamicThresholdingSchedule
        >>> sched = DynamicThresholdingSchedule(7.0, "linear down")
        >>> [sched(step, 4) for step in range(4)]
        [7.0, 5.0, 3.0, 1.0]
    """

    scale: float
    mode: str = "constant"
    minimum: float = 1.0
    value: float = 4.0

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str):
            raise TypeError(f"`mode` must be a string, got {type(self.mode).__name__}.")
        mode = check_choice(self.mode.lower(), "mode", DYNAMIC_THRESHOLDING_MODES)
        value = check_finite(self.value, "value")
        if mode in ("power up", "power down"):
            value = check_range(value, "value", 0.0, math.inf, hi_open=True)
        if mode == "cosine repeating" and not math.isfinite(6.28318 * value):
            raise ValueError(f"`value` must keep 6.28318 * value finite in mode {mode!r}, got {value!r}.")
        _set(
            self,
            scale=check_finite(self.scale, "scale"),
            minimum=check_finite(self.minimum, "minimum"),
            mode=mode,
            value=value,
        )

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        check_call(step, num_steps, sigma)
        t = progress(step, num_steps, "dynamic-thresholding")
        f = _dynamic_thresholding_factor(self.mode, t, self.value)
        return _result(_lerp(self.minimum, self.scale, f), "the dynamic-thresholding scale")


_SCHEDULE_TYPES = (
    Constant,
    Linear,
    Cosine,
    Window,
    Interval,
    BetaPdf,
    Cutoff,
    FunctionSchedule,
    MeanNormalized,
    DynamicThresholdingSchedule,
)


def as_schedule(value: float | int | Schedule | Callable[..., float]) -> Schedule:
    """A number becomes :class:`Constant`; a schedule object is returned as is; any other callable is wrapped.

    Args:
        value (float | Schedule | Callable): a finite number, a schedule of this module, or a callable
            ``(step[, num_steps[, sigma]]) -> float`` (wrapped in :class:`FunctionSchedule`).

    Raises ``TypeError`` for anything else (``bool`` included), ``ValueError`` for a non-finite number.

    Example:
        >>> from guidance.schedules import as_schedule
        >>> as_schedule(1.5)
        Constant(scale=1.5)
    """
    if isinstance(value, _SCHEDULE_TYPES):
        return value
    if is_real_number(value):
        return Constant(check_finite(value, "scale"))
    if callable(value) and not isinstance(value, bool):
        return FunctionSchedule(value)
    raise TypeError(
        f"Expected a number, a Schedule or a callable for the guidance scale, got {type(value).__name__} {value!r}."
    )
