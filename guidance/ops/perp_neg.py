"""Perp-Neg (Armandpour et al. 2023): negative prompts without the Janus problem."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops._common import (
    Scale,
    _as_batch_scale,
    _check_pair,
    _is_one,
    _keep_cond_where_one,
    _sample_dims,
    _vector_batch,
    _work_dtype,
)
from guidance.validation import check_range as _check_range


@_vector_batch
def perp_neg(
    cond: Tensor,
    uncond: Tensor,
    negative: Tensor,
    scale: Scale,
    neg_scale: float = 1.0,
    dims: int | tuple[int, ...] | None = None,
) -> Tensor:
    """Perp-Neg (Armandpour et al. 2023) with positive ``cond``, ``negative`` and empty-prompt ``uncond``.

    ``p = c - u``, ``n = negative - u``, ``n_perp = n - <n, p> / ||p||^2 p`` (per sample), and
    ``g = u + w (p - neg_scale * n_perp)``: only the part of the negative direction orthogonal to
    the positive one is subtracted. ComfyUI's ``perp_neg`` reduces over the whole batch; it agrees
    with this per-sample form for batch 1. ``scale == 1`` is guidance off and returns ``cond``
    (ComfyUI still subtracts ``n_perp`` there). ``p = 0`` gives ``n_perp = n``, not NaN.

    Example:
        >>> import torch
        >>> from guidance.ops import perp_neg
        >>> c, u, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
        >>> perp_neg(c, u, n, 2.0)
        tensor([[ 2., -2.]])
    """
    neg_scale = _check_range(neg_scale, "neg_scale", 0.0, math.inf)
    if math.isinf(neg_scale):
        raise ValueError(f"`neg_scale` must be finite, got {neg_scale!r}.")
    _check_pair(cond, uncond)
    _check_pair(cond, negative)
    if _is_one(scale):
        return cond
    dims_ = _sample_dims(cond, dims)
    dtype = _work_dtype(cond)
    c, u, n = cond.to(dtype), uncond.to(dtype), negative.to(dtype)
    pos, neg = c - u, n - u
    dot = (neg * pos).sum(dim=dims_, keepdim=True)
    squared_norm = (pos * pos).sum(dim=dims_, keepdim=True)
    coef = torch.where(squared_norm > 0, dot / squared_norm, torch.zeros_like(dot))
    perp = neg - coef * pos
    w = _as_batch_scale(scale, c)
    guided = u + w * (pos - neg_scale * perp)
    return _keep_cond_where_one(scale, cond, guided.to(cond.dtype))
