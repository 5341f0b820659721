"""Shared helpers of the operators: scale handling, shape checks, work dtypes."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from guidance.validation import check_scale

Scale = float | int | Tensor


def validate_scale(scale: Scale, name: str = "guidance_scale") -> None:
    """Raise unless every scale is a finite real number (see :func:`guidance.validation.check_scale`)."""
    check_scale(scale, name)


def _is_one(scale: Scale) -> bool:
    return not isinstance(scale, Tensor) and scale == 1


def _is_zero(scale: Scale) -> bool:
    return not isinstance(scale, Tensor) and scale == 0


def _as_batch_scale(scale: Scale, like: Tensor) -> Scale:
    """A ``(B,)`` tensor scale becomes ``(B, 1, ..., 1)`` so it broadcasts per sample."""
    if not isinstance(scale, Tensor):
        return scale
    scale = scale.to(device=like.device, dtype=like.dtype)
    if scale.ndim == 1 and like.ndim > 1:
        scale = scale.reshape(-1, *([1] * (like.ndim - 1)))
    return scale


def _check_pair(cond: Tensor, uncond: Tensor) -> None:
    if cond.shape != uncond.shape:
        raise ValueError(
            f"`cond` and `uncond` must have the same shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}."
        )


def _masked_combine(cond: Tensor, uncond: Tensor, scale: Scale) -> Tensor:
    """``u + w (c - u)`` where entries that are ``-inf`` in either branch stay ``-inf``.

    ``-inf`` marks a token that a processor or mask removed; combining two of them
    would compute ``inf - inf``. A token removed from either branch is removed from
    the guided distribution (only the branch with non-zero weight counts at w = 0/1,
    which the callers handle before getting here).
    """
    w = _as_batch_scale(scale, cond)
    cond_finite = torch.isfinite(cond)
    uncond_finite = torch.isfinite(uncond)
    both_finite = cond_finite & uncond_finite
    if bool(both_finite.all()):
        guided = w * (cond - uncond) + uncond
    else:
        c = torch.where(both_finite, cond, torch.zeros_like(cond))
        u = torch.where(both_finite, uncond, torch.zeros_like(uncond))
        guided = torch.where(both_finite, w * (c - u) + u, torch.full_like(cond, -math.inf))
    if isinstance(w, Tensor):
        guided = torch.where(w == 1, cond, torch.where(w == 0, uncond, guided))
    return guided


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _sample_dims(x: Tensor, dims: int | tuple[int, ...] | list[int] | None) -> list[int]:
    if dims is None:
        return list(range(1, x.ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims or any(not (-x.ndim <= d < x.ndim) for d in dims):
        raise ValueError(f"`dims` must be a non-empty list of dimensions of a {x.ndim}-d tensor, got {dims}.")
    return dims


def _keep_cond_where_one(scale: Scale, cond: Tensor, guided: Tensor) -> Tensor:
    w = _as_batch_scale(scale, cond)
    return torch.where(w == 1, cond, guided) if isinstance(w, Tensor) else guided


def _vector_batch(fn):
    """Lets an operator take ``(B,)`` inputs (one scalar per sample) by viewing them as ``(B, 1)``."""

    @functools.wraps(fn)
    def wrapped(cond: Tensor, *args, **kwargs):
        if cond.ndim == 1 and kwargs.get("dims") is None:
            args = tuple(a.unsqueeze(-1) if isinstance(a, Tensor) and a.ndim == 1 else a for a in args)
            if isinstance(kwargs.get("negative"), Tensor):
                kwargs["negative"] = kwargs["negative"].unsqueeze(-1)
            return fn(cond.unsqueeze(-1), *args, **kwargs).squeeze(-1)
        return fn(cond, *args, **kwargs)

    return wrapped


def _float64_device(x: Tensor) -> torch.device:
    return torch.device("cpu") if x.device.type in {"mps", "npu"} else x.device
