"""CFG-Zero* (Fan et al. 2025): optimised scale and zero-init."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops._common import Scale, _check_pair, _is_one, _sample_dims, _vector_batch, _work_dtype
from guidance.ops.cfg import cfg
from guidance.validation import check_range as _check_range


@_vector_batch
def zero_star_alpha(
    cond: Tensor, uncond: Tensor, eps: float = 1e-8, dims: int | tuple[int, ...] | None = None
) -> Tensor:
    """CFG-Zero*'s per-sample optimised scale ``<c, u> / (||u||^2 + eps)``, shaped ``(B, 1, ..., 1)``.

    Computed in float32 at least and returned in the dtype of ``cond``, as diffusers'
    ``cfg_zero_star_scale``. ``u = 0`` gives 0, not NaN.

    Example:
        >>> import torch
        >>> from guidance.ops import zero_star_alpha
        >>> zero_star_alpha(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
        tensor([[2.]])
    """
    _check_pair(cond, uncond)
    _check_range(eps, "eps", 0.0, math.inf)
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)
    if dims is None:
        c, u = c.flatten(1), u.flatten(1)
        dot = torch.sum(c * u, dim=1, keepdim=True)
        alpha = dot / (torch.sum(u**2, dim=1, keepdim=True) + eps)
        alpha = alpha.view(-1, *([1] * (cond.ndim - 1)))
    else:
        dims_ = _sample_dims(cond, dims)
        alpha = torch.sum(c * u, dim=dims_, keepdim=True) / (torch.sum(u**2, dim=dims_, keepdim=True) + eps)
    alpha = torch.where(torch.isfinite(alpha), alpha, torch.zeros_like(alpha))
    return alpha.to(cond.dtype)


def cfg_zero_star(
    cond: Tensor,
    uncond: Tensor,
    scale: Scale,
    *,
    eps: float = 1e-8,
    dims: int | tuple[int, ...] | None = None,
) -> Tensor:
    """CFG-Zero* (Fan et al. 2025): ``a u + w (c - a u)`` with ``a`` = :func:`zero_star_alpha`.

    The same operations as diffusers' ``ClassifierFreeZeroStarGuidance`` (bit-identical in float32).
    Zero-init (output 0 for the first steps) is a property of the sampling run, not of one
    combination: the :class:`~guidance.guiders.CFGZeroStar` guider does it. Returns ``cond`` at ``scale == 1``.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_zero_star
        >>> cfg_zero_star(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 0.0]]), 2.0)
        tensor([[2., 2.]])
    """
    _check_pair(cond, uncond)
    if _is_one(scale):
        return cond
    scaled_uncond = uncond * zero_star_alpha(cond, uncond, eps=eps, dims=dims)
    return cfg(cond, scaled_uncond, scale)
