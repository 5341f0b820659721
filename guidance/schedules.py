"""Guidance-weight schedules shared by the language-model and diffusion paths.

A schedule maps ``(step, num_steps, sigma)`` to a guidance scale in the convention of
:mod:`guidance.ops` (``1.0`` is guidance off). ``step`` counts from 0; ``num_steps`` is the
total number of steps when known (sampling steps for diffusion, ``max_new_tokens`` for a
language model) and ``sigma`` the current noise level when known (diffusion only).

A schedule that returns exactly ``1.0`` at a step turns guidance off there, and callers
that can (adaptive LM decoding, the diffusion wrapper) then skip the unconditional
evaluation entirely.

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
from typing import Protocol, runtime_checkable

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
]


@runtime_checkable
class Schedule(Protocol):
    """Anything callable as ``schedule(step, num_steps=None, sigma=None) -> float``."""

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float: ...


def _finite(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return value


def progress(step: int, num_steps: int | None, schedule_name: str) -> float:
    """Fraction of sampling done, ``step / (num_steps - 1)`` in ``[0, 1]``."""
    if num_steps is None:
        raise ValueError(
            f"The {schedule_name} schedule needs `num_steps` (the total number of steps or new tokens)."
        )
    if num_steps < 1:
        raise ValueError(f"`num_steps` must be >= 1, got {num_steps}.")
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}.")
    if num_steps == 1:
        return 1.0
    return min(step / (num_steps - 1), 1.0)


@dataclass(frozen=True)
class Constant:
    """The same scale at every step."""

    scale: float

    def __post_init__(self) -> None:
        _finite(self.scale, "scale")

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        return float(self.scale)


@dataclass(frozen=True)
class Linear:
    """Linear ramp from ``start`` (first step) to ``end`` (last step).

    Increasing ramps (``start < end``: low guidance at high noise, high near the end) are
    what Wang et al. (TMLR 2024) found to beat a constant scale at equal mean.
    """

    start: float
    end: float

    def __post_init__(self) -> None:
        _finite(self.start, "start")
        _finite(self.end, "end")

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        t = progress(step, num_steps, "linear")
        return self.start + (self.end - self.start) * t


@dataclass(frozen=True)
class Cosine:
    """Half-cosine ramp ``start + (end - start) * (1 - cos(pi t)) / 2``."""

    start: float
    end: float

    def __post_init__(self) -> None:
        _finite(self.start, "start")
        _finite(self.end, "end")

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        t = progress(step, num_steps, "cosine")
        return self.start + (self.end - self.start) * (1.0 - math.cos(math.pi * t)) / 2.0


@dataclass(frozen=True)
class Window:
    """``scale`` for steps in ``[start_step, end_step)``, ``off_scale`` (default 1: off) elsewhere.

    ``end_step=None`` means "until the end".
    """

    scale: float
    start_step: int = 0
    end_step: int | None = None
    off_scale: float = 1.0

    def __post_init__(self) -> None:
        _finite(self.scale, "scale")
        _finite(self.off_scale, "off_scale")
        if self.start_step < 0:
            raise ValueError(f"`start_step` must be >= 0, got {self.start_step}.")
        if self.end_step is not None and self.end_step < self.start_step:
            raise ValueError(f"`end_step` must be >= `start_step` ({self.start_step}), got {self.end_step}.")

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        inside = step >= self.start_step and (self.end_step is None or step < self.end_step)
        return float(self.scale) if inside else float(self.off_scale)


@dataclass(frozen=True)
class Interval:
    """Guidance interval (Kynkaanniemi et al. 2024): ``scale`` for ``sigma_lo < sigma <= sigma_hi``, else 1.

    Outside the interval the conditional prediction is used alone, and the
    unconditional evaluation can be skipped.
    """

    scale: float
    sigma_lo: float
    sigma_hi: float = math.inf

    def __post_init__(self) -> None:
        _finite(self.scale, "scale")
        if not (0.0 <= self.sigma_lo < self.sigma_hi):
            raise ValueError(
                f"`sigma_lo` and `sigma_hi` must satisfy 0 <= sigma_lo < sigma_hi, got {self.sigma_lo}, {self.sigma_hi}."
            )

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        if sigma is None:
            raise ValueError("The interval schedule needs `sigma`, the current noise level.")
        return float(self.scale) if self.sigma_lo < float(sigma) <= self.sigma_hi else 1.0


@dataclass(frozen=True)
class BetaPdf:
    """beta-CFG's time weighting (Malarz et al.): ``scale * beta_pdf(t; a, b)``, ``t = step / (N - 1)``.

    The norm scaling part of beta-CFG is an operator (:func:`guidance.ops.beta_cfg`);
    this is the schedule it is paired with. Paper example: ``scale=7.5, a=2, b=3``.
    """

    scale: float
    a: float = 2.0
    b: float = 3.0

    def __post_init__(self) -> None:
        _finite(self.scale, "scale")
        if not (self.a > 0 and self.b > 0):
            raise ValueError(f"`a` and `b` must be > 0, got a={self.a}, b={self.b}.")

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        t = progress(step, num_steps, "beta")
        log_norm = math.lgamma(self.a) + math.lgamma(self.b) - math.lgamma(self.a + self.b)
        if (t == 0.0 and self.a < 1) or (t == 1.0 and self.b < 1):
            raise ValueError("beta_pdf is infinite at the ends of [0, 1] when a < 1 or b < 1.")
        if (t == 0.0 and self.a > 1) or (t == 1.0 and self.b > 1):
            return 0.0
        log_pdf = (self.a - 1) * _safe_log(t) + (self.b - 1) * _safe_log(1 - t) - log_norm
        return float(self.scale) * math.exp(log_pdf)


def _safe_log(x: float) -> float:
    return math.log(x) if x > 0 else 0.0


@dataclass(frozen=True)
class Cutoff:
    """``scale`` for the first ``fraction`` of the steps, then 1 (guidance off, no unconditional evaluation).

    The schedule form of diffusers' ``SDCFGCutoffCallback(cutoff_step_ratio=...)``, correct for any batch size.
    """

    scale: float
    fraction: float

    def __post_init__(self) -> None:
        _finite(self.scale, "scale")
        if not (0.0 <= self.fraction <= 1.0):
            raise ValueError(f"`fraction` must be in [0, 1], got {self.fraction}.")

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        if num_steps is None:
            raise ValueError("The cutoff schedule needs `num_steps`.")
        return float(self.scale) if step < int(num_steps * self.fraction) else 1.0


@dataclass(frozen=True)
class FunctionSchedule:
    """Wraps a user callable. It may take ``(step)``, ``(step, num_steps)`` or ``(step, num_steps, sigma)``."""

    fn: Callable[..., float]
    arity: int = field(default=3, compare=False)

    def __post_init__(self) -> None:
        import inspect

        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):
            return
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            return
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        object.__setattr__(self, "arity", max(1, min(3, len(positional))))

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        args = (step, num_steps, sigma)[: self.arity]
        return _finite(self.fn(*args), "schedule(step)")


@dataclass
class MeanNormalized:
    """Rescales ``schedule`` so that its mean over ``num_steps`` steps is ``target_mean``.

    The guidance part ``w - 1`` is multiplied by ``(target_mean - 1) / (mean - 1)``, so
    steps where the base schedule is off (``w = 1``) stay off. Use it to compare
    schedules at equal mean scale, as Wang et al. do.
    """

    schedule: Schedule
    target_mean: float
    _cache: dict[int, float] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _finite(self.target_mean, "target_mean")

    def _factor(self, num_steps: int) -> float:
        if num_steps not in self._cache:
            mean = sum(self.schedule(i, num_steps, None) for i in range(num_steps)) / num_steps
            if abs(mean - 1.0) < 1e-12:
                raise ValueError("Cannot normalise a schedule whose mean scale is 1 (guidance off throughout).")
            self._cache[num_steps] = (self.target_mean - 1.0) / (mean - 1.0)
        return self._cache[num_steps]

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        if num_steps is None:
            raise ValueError("MeanNormalized needs `num_steps`.")
        return 1.0 + (self.schedule(step, num_steps, sigma) - 1.0) * self._factor(num_steps)


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
        _finite(self.scale, "scale")
        _finite(self.minimum, "minimum")
        _finite(self.value, "value")
        mode = self.mode.lower() if isinstance(self.mode, str) else self.mode
        if mode not in DYNAMIC_THRESHOLDING_MODES:
            raise ValueError(f"`mode` must be one of {DYNAMIC_THRESHOLDING_MODES}, got {self.mode!r}.")
        object.__setattr__(self, "mode", mode)
        if mode in ("power up", "power down") and self.value < 0:
            raise ValueError(f"`value` (the power) must be >= 0 for mode {mode!r}, got {self.value}.")

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        progress(step, num_steps, "dynamic-thresholding")
        t = step / max(num_steps - 1, 1)
        mode, v = self.mode, self.value
        if mode == "constant":
            f = 1.0
        elif mode == "linear down":
            f = 1.0 - t
        elif mode == "half cosine down":
            f = math.cos(t)
        elif mode == "cosine down":
            f = math.cos(t * 1.5707)
        elif mode == "linear up":
            f = t
        elif mode == "half cosine up":
            f = 1.0 - math.cos(t)
        elif mode == "cosine up":
            f = 1.0 - math.cos(t * 1.5707)
        elif mode == "power up":
            f = math.pow(t, v)
        elif mode == "power down":
            f = 1.0 - math.pow(t, v)
        elif mode == "linear repeating":
            portion = (t * v) % 1.0
            f = (0.5 - portion) * 2 if portion < 0.5 else (portion - 0.5) * 2
        elif mode == "cosine repeating":
            f = math.cos(t * 6.28318 * v) * 0.5 + 0.5
        else:
            f = (t * v) % 1.0
        return (self.scale - self.minimum) * f + self.minimum


def as_schedule(value: float | int | Schedule | Callable[..., float]) -> Schedule:
    """A number becomes :class:`Constant`; a schedule object is returned as is; any other callable is wrapped."""
    if isinstance(value, bool):
        raise ValueError(f"A guidance scale or schedule is required, got {value!r}.")
    if isinstance(value, (int, float)):
        return Constant(float(value))
    if isinstance(
        value,
        (
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
        ),
    ):
        return value
    if callable(value):
        return FunctionSchedule(value)
    raise ValueError(f"Expected a number, a Schedule or a callable for the guidance scale, got {type(value).__name__}.")
