"""Argument checks shared by every public function: one home, one wording.

Each check raises ``TypeError`` for a value of the wrong type and ``ValueError`` for a value
out of range, naming the argument and the valid range, and returns the value normalised
(Python ``float``/``int``). Tensor checks that would need the tensor's values (finiteness)
synchronise with the device, so call them where a tensor enters (a guider, an adapter), not
once per step inside a GPU hot loop.

Example:
    >>> from guidance.validation import check_range, check_int
    >>> check_range(0.5, "phi", 0.0, 1.0)
    0.5
    >>> check_int(3, "min_tokens_to_keep", minimum=1)
    3
    >>> check_range(float("nan"), "phi", 0.0, 1.0)
    Traceback (most recent call last):
    ...
    ValueError: `phi` must be a number in [0.0, 1.0], got nan.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "is_real_number",
    "check_number",
    "check_finite",
    "check_range",
    "check_int",
    "check_choice",
    "check_scale",
    "check_batch_scale",
    "check_tensor",
    "check_same_shape",
    "check_no_nan",
]


def is_real_number(value: Any) -> bool:
    """``True`` for Python/NumPy real numbers (not ``bool``) and 0-d real tensors."""
    if isinstance(value, bool):
        return False
    if isinstance(value, Tensor):
        return value.ndim == 0 and not value.is_complex() and not value.dtype == torch.bool
    try:
        import numbers

        return isinstance(value, numbers.Real)
    except ImportError:  # pragma: no cover
        return isinstance(value, (int, float))


def check_number(value: Any, name: str) -> float:
    """A real number (``bool`` refused); returns it as ``float``. NaN and infinities pass."""
    if not is_real_number(value):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}.")
    return float(value)


def check_finite(value: Any, name: str) -> float:
    """A finite real number in (-inf, inf)."""
    number = check_number(value, name)
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite real number in (-inf, inf), got {value!r}.")
    return number


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def check_range(
    value: Any, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> float:
    """A real number in the interval from ``lo`` to ``hi`` (closed unless ``lo_open``/``hi_open``).

    NaN is always refused; an infinite end is allowed only when that end of the interval is
    infinite and closed (``check_range(x, "w", 0, math.inf)`` accepts ``inf``; pass
    ``hi_open=True`` to refuse it).
    """
    number = check_number(value, name)
    ok = (lo < number if lo_open else lo <= number) and (number < hi if hi_open else number <= hi)
    if math.isnan(number) or not ok:
        raise ValueError(
            f"`{name}` must be a number in {_interval(lo, hi, lo_open, hi_open)}, got {value!r}."
        )
    return number


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (``bool`` refused) with optional inclusive bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        if not (isinstance(value, Tensor) and value.ndim == 0 and not value.is_floating_point()):
            raise TypeError(f"`{name}` must be an integer, got {type(value).__name__} {value!r}.")
        value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"`{name}` must be an integer in [{lo}, {hi}], got {value!r}.")
    return int(value)


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """One of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


def check_tensor(value: Any, name: str, *, floating: bool = False) -> Tensor:
    """A ``torch.Tensor`` (a floating-point one with ``floating=True``)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
    if floating and not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {value.dtype}.")
    return value


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Two tensors of one shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def check_no_nan(value: Tensor, name: str) -> Tensor:
    """A tensor without NaN (``-inf``/``+inf`` pass: they mean masked or saturated entries). Syncs."""
    if value.is_floating_point() and bool(torch.isnan(value).any()):
        raise ValueError(f"`{name}` contains NaN; every entry must be a number or -inf (masked).")
    return value


def check_scale(scale: Any, name: str = "guidance_scale") -> float | Tensor:
    """A guidance scale: a finite real number, or a real tensor of finite numbers (syncs once).

    Returns a Python ``float`` for numbers and the tensor unchanged otherwise.
    """
    if isinstance(scale, Tensor):
        if scale.is_complex() or scale.dtype == torch.bool:
            raise TypeError(f"`{name}` must be a real tensor, got dtype {scale.dtype}.")
        if not bool(torch.isfinite(scale).all()):
            raise ValueError(f"`{name}` must be finite real numbers in (-inf, inf), got {scale}.")
        return scale
    return check_finite(scale, name)


def check_batch_scale(scale: float | Tensor, batch: int, name: str = "guidance_scale") -> None:
    """A tensor scale must be a scalar or hold one value per sample: shape ``()``, ``(1,)`` or ``(batch,)``
    (optionally followed by singleton dimensions). Numbers always pass. Does not sync."""
    if not isinstance(scale, Tensor) or scale.ndim == 0:
        return
    leading = scale.shape[0]
    if leading not in (1, batch) or any(s != 1 for s in scale.shape[1:]):
        raise ValueError(
            f"`{name}` must be a number or a tensor of shape (), (1,) or ({batch},) (one scale per sample), "
            f"got shape {tuple(scale.shape)}."
        )
