"""Beta-CFG: guidance scaled by a beta-distribution weight over time."""

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
def beta_cfg(
    cond: Tensor,
    uncond: Tensor,
    scale: Scale,
    gamma: float = 1.0,
    dims: int | tuple[int, ...] | None = None,
) -> Tensor:
    """beta-CFG's norm scaling (Malarz et al.): ``u + w (c - u) / ||c - u||^gamma`` (per-sample norm).

    The time weighting ``beta_pdf(t; a, b)`` is the schedule :class:`guidance.schedules.BetaPdf`; the
    :class:`~guidance.guiders.BetaCFG` guider pairs them as the authors' code does
    (``u + w * beta_pdf(t) * (c - u) / ||c - u||^gamma``). ``gamma = 0`` is plain CFG. ``scale == 1``
    is guidance off and returns ``cond``. ``c = u`` gives ``u``, not NaN.

    Example:
        >>> import torch
        >>> from guidance.ops import beta_cfg
        >>> beta_cfg(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]]), 2.0)
        tensor([[1.2000, 1.6000]])
    """
    gamma = _check_range(gamma, "gamma", 0.0, math.inf)
    if math.isinf(gamma):
        raise ValueError(f"`gamma` must be finite, got {gamma!r}.")
    _check_pair(cond, uncond)
    if _is_one(scale):
        return cond
    dims_ = _sample_dims(cond, dims)
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)
    diff = c - u
    norm = diff.norm(p=2, dim=dims_, keepdim=True)
    denominator = torch.where(norm > 0, norm**gamma, torch.ones_like(norm))
    w = _as_batch_scale(scale, c)
    guided = u + w * (diff / denominator)
    return _keep_cond_where_one(scale, cond, guided.to(cond.dtype))
