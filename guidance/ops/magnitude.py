"""Magnitude-aware guidance, MAMBO-G (arXiv 2508.03442)."""

from __future__ import annotations

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


def magnitude_ratio(cond: Tensor, uncond: Tensor, dims: int | tuple[int, ...] | None = None) -> Tensor:
    """``r = ||c - u|| / ||u||`` per sample (``keepdim``), in ``cond``'s work dtype.

    ``||u|| = 0`` gives ``r = inf`` where ``c != u`` and ``r = 0`` where ``c == u`` (never NaN).
    """
    _check_pair(cond, uncond)
    dims_ = _sample_dims(cond, dims)
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)
    diff_norm = torch.linalg.vector_norm(c - u, dim=dims_, keepdim=True)
    uncond_norm = torch.linalg.vector_norm(u, dim=dims_, keepdim=True)
    ratio = diff_norm / uncond_norm
    return torch.where(torch.isnan(ratio), torch.zeros_like(ratio), ratio)


@_vector_batch
def mambo_g(
    cond: Tensor,
    uncond: Tensor,
    scale: Scale,
    *,
    alpha: float = 8.0,
    dims: int | tuple[int, ...] | None = None,
) -> Tensor:
    """MAMBO-G: CFG whose scale decays towards 1 where the update is large relative to ``u``.

    ``r = ||c - u|| / ||u||`` per sample, ``w_eff = 1 + (w - 1) exp(-alpha r)`` and
    ``g = u + w_eff (c - u)`` (diffusers' ``MagnitudeAwareGuidance``, same float operations, so
    float32 results are bit-identical; its ``use_original_formulation=True`` with scale ``s`` is this
    function at ``w = s + 1``). ``alpha = 0`` is plain CFG. ``||u|| = 0`` gives ``w_eff = 1`` (``c``)
    instead of diffusers' NaN. Returns ``cond`` itself at ``scale == 1``.

    Example:
        >>> import torch
        >>> from guidance.ops import mambo_g
        >>> c, u = torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 4.0]])
        >>> mambo_g(c + 1.0, u, 5.0, alpha=0.0)  # alpha 0: plain CFG
        tensor([[8., 9.]])
    """
    alpha = _check_range(alpha, "alpha", 0.0, float("inf"), hi_open=True)
    _check_pair(cond, uncond)
    if _is_one(scale):
        return cond
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)
    diff = c - u
    ratio = magnitude_ratio(c, u, dims)
    w = _as_batch_scale(scale, c)
    effective = 1.0 + (w - 1.0) * torch.exp(-alpha * ratio)
    guided = u + effective * diff
    return _keep_cond_where_one(scale, cond, guided.to(cond.dtype))
