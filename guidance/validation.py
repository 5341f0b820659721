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
import numbers
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
    "check_tensor_range",
    "check_tensor",
    "check_same_shape",
    "check_no_nan",
    "check_logits",
    "check_dims",
    "check_dims_setting",
    "check_optional_int",
    "check_bool",
]


def is_real_number(value: Any) -> bool:
    """``True`` for Python/NumPy real numbers (not ``bool``) and 0-d real tensors.

    Args:
        value (Any): anything.

    Example:
        >>> from guidance.validation import is_real_number
        >>> is_real_number(2.5), is_real_number(True), is_real_number("2")
        (True, False, False)
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, Tensor):
        return value.ndim == 0 and not value.is_complex() and not value.dtype == torch.bool
    return isinstance(value, numbers.Real)


def check_number(value: Any, name: str) -> float:
    """A real number (``bool`` refused); returns it as ``float``. NaN and infinities pass.

    Args:
        value (Any): the argument's value.
        name (str): the argument's name, used in the ``TypeError``.

    Example:
        >>> from guidance.validation import check_number
        >>> check_number(3, "scale")
        3.0
    """
    if not is_real_number(value):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}.")
    return float(value)


def check_finite(value: Any, name: str) -> float:
    """A finite real number in (-inf, inf), returned as ``float``.

    Args:
        value (Any): the argument's value.
        name (str): the argument's name, used in the error.

    Example:
        >>> from guidance.validation import check_finite
        >>> check_finite(float("inf"), "eta")
        Traceback (most recent call last):
        ...
        ValueError: `eta` must be a finite real number in (-inf, inf), got inf.
    """
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

    Args:
        value (Any): the argument's value.
        name (str): the argument's name, used in the error.
        lo (float): lower end (``-inf`` allowed).
        hi (float): upper end (``inf`` allowed).
        lo_open (bool): exclude ``lo``.
        hi_open (bool): exclude ``hi``.

    Example:
        >>> import math
        >>> from guidance.validation import check_range
        >>> check_range(math.inf, "gamma", 0.0, math.inf, hi_open=True)
        Traceback (most recent call last):
        ...
        ValueError: `gamma` must be a number in [0.0, inf), got inf.
    """
    number = check_number(value, name)
    ok = (lo < number if lo_open else lo <= number) and (number < hi if hi_open else number <= hi)
    if math.isnan(number) or not ok:
        raise ValueError(
            f"`{name}` must be a number in {_interval(lo, hi, lo_open, hi_open)}, got {value!r}."
        )
    return number


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (Python, NumPy or a 0-d integer tensor; ``bool`` refused) with optional inclusive bounds.

    Args:
        value (Any): the argument's value.
        name (str): the argument's name, used in the error.
        minimum (int | None): inclusive lower bound, if any.
        maximum (int | None): inclusive upper bound, if any.

    Example:
        >>> from guidance.validation import check_int
        >>> check_int(2.0, "step")
        Traceback (most recent call last):
        ...
        TypeError: `step` must be an integer, got float 2.0.
    """
    if isinstance(value, Tensor) and value.ndim == 0 and not value.is_floating_point() and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__} {value!r}.")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"`{name}` must be an integer in [{lo}, {hi}], got {value!r}.")
    return value


def check_optional_int(value: Any, name: str, minimum: int | None = None) -> int | None:
    """``None`` or an integer ``>= minimum`` (see :func:`check_int`).

    Args:
        value (Any): the argument's value.
        name (str): the argument's name, used in the error.
        minimum (int | None): inclusive lower bound, if any.

    Example:
        >>> from guidance.validation import check_optional_int
        >>> check_optional_int(None, "num_steps", 1) is None
        True
    """
    return None if value is None else check_int(value, name, minimum)


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """One of ``choices`` (``ValueError`` listing them otherwise).

    Args:
        value (Any): the argument's value.
        name (str): the argument's name, used in the error.
        choices (Iterable): the allowed values.

    Example:
        >>> from guidance.validation import check_choice
        >>> check_choice("paper", "convention", ("paper", "diffusers"))
        'paper'
    """
    choices = tuple(choices)
    try:
        ok = value in choices
    except TypeError:  # an unhashable or incomparable value
        ok = False
    if not ok:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


def check_tensor(
    value: Any, name: str, *, floating: bool = False, real: bool = False, min_ndim: int = 0
) -> Tensor:
    """A ``torch.Tensor`` (``TypeError`` otherwise), floating-point with ``floating=True`` or real
    (neither complex nor bool) with ``real=True`` (``TypeError``), with at least ``min_ndim``
    dimensions (``ValueError``). Never reads the values (no device sync).

    Args:
        value (Any): the argument's value.
        name (str): the argument's name, used in the error.
        floating (bool): require a floating-point dtype.
        real (bool): require a real dtype (integer or floating point, not bool).
        min_ndim (int): the least number of dimensions.

    Example:
        >>> import torch
        >>> from guidance.validation import check_tensor
        >>> check_tensor(torch.zeros(2, dtype=torch.long), "cond", floating=True)
        Traceback (most recent call last):
        ...
        TypeError: `cond` must be a floating-point tensor, got dtype torch.int64.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
    if floating and not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {value.dtype}.")
    if real:
        _check_real_tensor(value, name)
    if value.ndim < min_ndim:
        raise ValueError(
            f"`{name}` must have at least {min_ndim} dimension(s) (batch first), got shape {tuple(value.shape)}."
        )
    return value


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Two tensors of one shape (``ValueError`` naming both otherwise).

    Args:
        a (Tensor): the first tensor.
        b (Tensor): the second tensor.
        name_a (str): the first argument's name.
        name_b (str): the second argument's name.

    Example:
        >>> import torch
        >>> from guidance.validation import check_same_shape
        >>> check_same_shape(torch.zeros(2), torch.zeros(2), "cond", "uncond")
    """
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def check_no_nan(value: Tensor, name: str) -> Tensor:
    """A tensor without NaN (``-inf``/``+inf`` pass: they mean masked or saturated entries). Syncs.

    Args:
        value (Tensor): the tensor.
        name (str): the argument's name, used in the error.

    Example:
        >>> import torch
        >>> from guidance.validation import check_no_nan
        >>> check_no_nan(torch.tensor([0.0, -float("inf")]), "scores")
        tensor([0., -inf])
    """
    if value.is_floating_point() and bool(torch.isnan(value).any()):
        raise ValueError(f"`{name}` contains NaN; every entry must be a number or -inf (masked).")
    return value


def check_logits(value: Tensor, name: str) -> Tensor:
    """Scores a softmax can take: finite numbers or ``-inf`` (masked); NaN and ``+inf`` are refused.

    One device sync when the scores are valid (call it where scores enter, or only on a slow path).

    Args:
        value (Tensor): the scores (non-floating tensors pass unchecked).
        name (str): the argument's name, used in the error.

    Example:
        >>> import torch
        >>> from guidance.validation import check_logits
        >>> check_logits(torch.tensor([0.0, float("inf")]), "cond_logits")
        Traceback (most recent call last):
        ...
        ValueError: `cond_logits` contains +inf; every entry must be a finite number or -inf (masked).
    """
    if not value.is_floating_point() or not bool((torch.isnan(value) | torch.isposinf(value)).any()):
        return value
    check_no_nan(value, name)
    raise ValueError(f"`{name}` contains +inf; every entry must be a finite number or -inf (masked).")


def _check_real_tensor(value: Tensor, name: str) -> None:
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"`{name}` must be a real tensor, got dtype {value.dtype}.")


def check_scale(scale: Any, name: str = "guidance_scale") -> float | Tensor:
    """A guidance scale: a finite real number, or a real tensor of finite numbers (syncs once).

    Returns a Python ``float`` for numbers and the tensor unchanged otherwise. Call it where a
    tensor scale enters (a guider, an adapter); operators use :func:`check_batch_scale`, which
    does not look at tensor values.

    Args:
        scale (Any): the scale.
        name (str): the argument's name, used in the error.

    Example:
        >>> import torch
        >>> from guidance.validation import check_scale
        >>> check_scale(torch.tensor([1.0, float("nan")]), "guidance_scale")
        Traceback (most recent call last):
        ...
        ValueError: `guidance_scale` must be finite real numbers in (-inf, inf), got tensor([1., nan]).
    """
    if isinstance(scale, Tensor):
        _check_real_tensor(scale, name)
        if not bool(torch.isfinite(scale).all()):
            raise ValueError(f"`{name}` must be finite real numbers in (-inf, inf), got {scale}.")
        return scale
    return check_finite(scale, name)


def check_tensor_range(
    value: Any, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> Tensor:
    """A real tensor whose every entry is a finite number in the interval from ``lo`` to ``hi``.

    Reads the values (one device sync): call it where a tensor enters, not once per step on a GPU.
    The tensor counterpart of :func:`check_range`; ``TypeError`` for a non-tensor or a complex or
    bool tensor, ``ValueError`` naming the argument and the interval otherwise.

    Args:
        value (Any): the argument's value.
        name (str): the argument's name, used in the error.
        lo (float): lower end (``-inf`` allowed; the entries must still be finite).
        hi (float): upper end (``inf`` allowed; the entries must still be finite).
        lo_open (bool): exclude ``lo``.
        hi_open (bool): exclude ``hi``.

    Example:
        >>> import torch
        >>> from guidance.validation import check_tensor_range
        >>> check_tensor_range(torch.tensor([0.5, 1.5]), "scale", 0.0, 1.0)
        Traceback (most recent call last):
        ...
        ValueError: `scale` must hold finite numbers in [0.0, 1.0], got tensor([0.5000, 1.5000]).
    """
    check_tensor(value, name, real=True)
    above = value > lo if lo_open else value >= lo
    below = value < hi if hi_open else value <= hi
    if not bool((torch.isfinite(value) & above & below).all()):
        shown = _interval(lo, hi, lo_open or math.isinf(lo), hi_open or math.isinf(hi))
        raise ValueError(f"`{name}` must hold finite numbers in {shown}, got {value}.")
    return value


def check_batch_scale(scale: Any, batch: int, name: str = "guidance_scale") -> float | Tensor:
    """A scale as the operators take it, checked without a device sync.

    A number must be finite (returned as ``float``). A tensor must be real and hold one value or one
    value per sample: shape ``()``, ``(1,)`` or ``(batch,)``, optionally followed by singleton
    dimensions (returned unchanged). Tensor values are not inspected (that would synchronise
    with the device): check them with :func:`check_scale` where they enter.

    Args:
        scale (Any): the scale.
        batch (int): the batch size of the tensors it scales.
        name (str): the argument's name, used in the error.

    Example:
        >>> import torch
        >>> from guidance.validation import check_batch_scale
        >>> check_batch_scale(torch.tensor([1.0, 2.0, 3.0]), 2, "scale")
        Traceback (most recent call last):
        ...
        ValueError: `scale` must be a number or a tensor of shape (), (1,) or (2,) (one scale per sample), got shape (3,).
    """
    if not isinstance(scale, Tensor):
        return check_finite(scale, name)
    _check_real_tensor(scale, name)
    if scale.ndim == 0:
        return scale
    leading = scale.shape[0]
    if leading not in (1, batch) or any(s != 1 for s in scale.shape[1:]):
        raise ValueError(
            f"`{name}` must be a number or a tensor of shape (), (1,) or ({batch},) (one scale per sample), "
            f"got shape {tuple(scale.shape)}."
        )
    return scale


def check_dims(dims: Any, ndim: int, name: str = "dims") -> list[int]:
    """Per-sample reduction dimensions of an ``ndim``-d tensor whose first dimension is the batch.

    ``None`` means every non-batch dimension. Otherwise an int or a sequence of distinct ints in
    ``[-ndim, ndim)`` that does not name the batch dimension (``0`` or ``-ndim``): reducing over
    it would mix samples. Returns non-negative dimensions.

    Args:
        dims (Any): ``None``, an int or a sequence of ints.
        ndim (int): the number of dimensions of the tensor reduced.
        name (str): the argument's name, used in the error.

    Example:
        >>> from guidance.validation import check_dims
        >>> check_dims(None, 4), check_dims((-1, -2), 4)
        ([1, 2, 3], [3, 2])
    """
    if dims is None:
        return list(range(1, ndim))
    items = [dims] if isinstance(dims, numbers.Integral) and not isinstance(dims, bool) else dims
    try:
        items = [check_int(d, name) for d in items]
    except TypeError as error:
        raise TypeError(f"`{name}` must be None, an int or a sequence of ints, got {dims!r}.") from error
    resolved = [d % ndim if -ndim <= d < ndim else None for d in items]
    if not items or None in resolved or 0 in resolved or len(set(resolved)) != len(resolved):
        raise ValueError(
            f"`{name}` must be distinct dimensions in [{-ndim + 1}, -1] or [1, {ndim - 1}] of a {ndim}-d tensor "
            f"(the batch dimension 0 excluded), got {dims!r}."
        )
    return resolved


def check_dims_setting(dims: Any, name: str = "dims") -> int | tuple[int, ...] | None:
    """A ``dims`` setting stored before any tensor is seen (a guider, a policy): ``None``, an int or a
    tuple of distinct non-zero ints. :func:`check_dims` checks it against the tensor later.

    Args:
        dims (Any): ``None``, an int or a sequence of ints.
        name (str): the argument's name, used in the error.

    Example:
        >>> from guidance.validation import check_dims_setting
        >>> check_dims_setting([-1, -2])
        (-1, -2)
    """
    if dims is None:
        return None
    single = isinstance(dims, numbers.Integral) and not isinstance(dims, bool)
    try:
        items = tuple(check_int(d, name) for d in ([dims] if single else dims))
    except TypeError as error:
        raise TypeError(f"`{name}` must be None, an int or a tuple of ints, got {dims!r}.") from error
    if not items or 0 in items or len(set(items)) != len(items):
        raise ValueError(f"`{name}` must be distinct non-batch dimensions (never 0), got {dims!r}.")
    return items[0] if single else items


def check_bool(value: Any, name: str) -> bool:
    """A ``bool`` (``TypeError`` otherwise; ``0``/``1`` and strings are refused, NumPy bools accepted).

    Args:
        value (Any): the argument's value.
        name (str): the argument's name, used in the error.

    Example:
        >>> from guidance.validation import check_bool
        >>> check_bool("yes", "use_zero_star")
        Traceback (most recent call last):
        ...
        TypeError: `use_zero_star` must be a bool, got str 'yes'.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} {value!r}.")
