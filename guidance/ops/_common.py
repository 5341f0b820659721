"""Shared helpers of the operators: argument checks, scale handling, the overflow-safe CFG combine."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from guidance.tensors import float64_device, per_sample, surely_finite, work_dtype
from guidance.tensors import saturate as _saturate
from guidance.validation import (
    check_batch_scale,
    check_dims,
    check_logits,
    check_same_shape,
    check_scale,
    check_tensor,
)

Scale = float | int | Tensor

# Kept under their historical private names for the operator modules.
_work_dtype = work_dtype
_float64_device = float64_device


def validate_scale(scale: Scale, name: str = "guidance_scale") -> None:
    """Raise unless every scale is a finite real number (see :func:`guidance.validation.check_scale`).

    Syncs with the device for a tensor scale: call it where a tensor scale enters (an adapter).

    Args:
        scale (float | Tensor): the scale to check.
        name (str): the argument's name for the error message.

    Example:
        >>> from guidance.ops import validate_scale
        >>> validate_scale(float("nan"), "scale")
        Traceback (most recent call last):
        ...
        ValueError: `scale` must be a finite real number in (-inf, inf), got nan.
    """
    check_scale(scale, name)


def _check_pair(cond: Tensor, uncond: Tensor, names: tuple[str, str] = ("cond", "uncond"), min_ndim: int = 0) -> None:
    check_tensor(cond, names[0], floating=True, min_ndim=min_ndim)
    check_tensor(uncond, names[1], floating=True, min_ndim=min_ndim)
    check_same_shape(cond, uncond, *names)


def _check_scale(scale: Scale, like: Tensor, name: str = "scale", *, rows: bool = False) -> float | Tensor:
    """A finite number (as ``float``) or a real tensor with one value or one per sample (values not read).

    ``rows=True`` (scores with the vocabulary last): a 1-d tensor is one row, so one scale."""
    batch = like.shape[0] if like.ndim > int(rows) else 1
    return check_batch_scale(scale, batch, name)


def _is_one(scale: Scale) -> bool:
    return not isinstance(scale, Tensor) and scale == 1


def _is_zero(scale: Scale) -> bool:
    return not isinstance(scale, Tensor) and scale == 0


def _as_batch_scale(scale: Scale, like: Tensor) -> Scale:
    """A tensor scale as ``(B, 1, ..., 1)`` in ``like``'s dtype and device; numbers unchanged."""
    if not isinstance(scale, Tensor):
        return scale
    return per_sample(scale.to(device=like.device, dtype=like.dtype), like)


def _combine(cond: Tensor, uncond: Tensor, w: float | Tensor) -> Tensor:
    """``u + w (c - u)`` (the reference operation order), with the form ``(1 - w) u + w c`` where
    that overflows (``c - u`` or ``w (c - u)`` beyond the range while the result is not): finite
    wherever the exact result is representable, ``+-finfo.max`` where it is not
    (:func:`guidance.tensors.saturate`),
    never NaN for finite inputs. No device sync."""
    guided = uncond + w * (cond - uncond)
    convex = (1 - w) * uncond + w * cond
    # Both forms overflow only where the exact result is out of range: keep the inf, not inf - inf.
    convex = torch.where(torch.isnan(convex), guided, convex)
    return _saturate(torch.where(torch.isfinite(guided), guided, convex), cond, uncond)


def _pin_rows(scale: Scale, guided: Tensor, one: Tensor, zero: Tensor | None = None) -> Tensor:
    """With a per-sample scale, rows whose scale is exactly 1 (0), in the scale's own precision,
    are ``one`` (``zero``) bit for bit."""
    if not isinstance(scale, Tensor):
        return guided
    scale = per_sample(scale.to(guided.device), guided)
    if zero is not None:
        guided = torch.where(scale == 0, zero.to(guided.dtype), guided)
    return torch.where(scale == 1, one.to(guided.dtype), guided)


def _keep_cond_where_one(scale: Scale, cond: Tensor, guided: Tensor) -> Tensor:
    """Rows whose scale is exactly 1 (in the scale's own precision) are ``cond`` bit for bit."""
    return _pin_rows(scale, guided, cond)


def _masked_combine(cond: Tensor, uncond: Tensor, w: float | Tensor, raw: tuple[Tensor, Tensor], names) -> Tensor:
    """``u + w (c - u)`` on scores where ``-inf`` marks a masked token.

    A token that is ``-inf`` (or whose normalised score is) in either branch stays ``-inf``; a row
    masked everywhere stays all ``-inf``. ``raw`` are the scores as given, checked for NaN and
    ``+inf`` (``ValueError``) only when some entry is not finite, so the common case costs one sync.
    """
    guided = uncond + w * (cond - uncond)
    if surely_finite(cond, uncond, guided):  # no mask and no overflow: _combine would return guided as is
        return guided
    finite = torch.isfinite(cond) & torch.isfinite(uncond)
    if bool(finite.all()):
        return _combine(cond, uncond, w)
    check_logits(raw[0], names[0])
    check_logits(raw[1], names[1])
    zero = torch.zeros((), dtype=cond.dtype, device=cond.device)
    c, u = torch.where(finite, cond, zero), torch.where(finite, uncond, zero)
    return torch.where(finite, _combine(c, u, w), torch.full_like(c, -math.inf))


def _sample_dims(x: Tensor, dims) -> list[int]:
    return check_dims(dims, x.ndim)


def _vector_batch(fn):
    """Lets an operator take ``(B,)`` inputs (one scalar per sample) by viewing them as ``(B, 1)``."""

    @functools.wraps(fn)
    def wrapped(cond: Tensor, *args, **kwargs):
        if isinstance(cond, Tensor) and cond.ndim == 1 and kwargs.get("dims") is None:
            args = tuple(a.unsqueeze(-1) if isinstance(a, Tensor) and a.ndim == 1 else a for a in args)
            for key in ("negative", "uncond", "cond"):
                if isinstance(kwargs.get(key), Tensor) and kwargs[key].ndim == 1:
                    kwargs[key] = kwargs[key].unsqueeze(-1)
            column = cond.unsqueeze(-1)
            out = fn(column, *args, **kwargs)
            return cond if out is column else out.squeeze(-1)  # guidance off stays `cond` itself
        return fn(cond, *args, **kwargs)

    return wrapped


def _float64_scalars(x: Tensor) -> Tensor:
    """Per-sample scalars in float64 (on a device that has it) for the small exact bookkeeping."""
    return x.to(device=float64_device(x), dtype=torch.float64)
