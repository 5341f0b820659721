"""Perp-Neg (Armandpour et al. 2023): negative prompts without the Janus problem."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops._common import (
    Scale,
    _as_batch_scale,
    _check_pair,
    _check_scale,
    _is_one,
    _keep_cond_where_one,
    _sample_dims,
    _saturate,
    _vector_batch,
    _work_dtype,
)
from guidance.tensors import pow2_scale
from guidance.validation import check_range, check_same_shape, check_tensor


def check_neg_scale(neg_scale: float) -> float:
    """Perp-Neg's ``neg_scale``: a finite number ``>= 0`` (shared by the op and the guider).

    Args:
        neg_scale (float): the value to check.

    Example:
        >>> from guidance.ops.perp_neg import check_neg_scale
        >>> check_neg_scale(2)
        2.0
    """
    return check_range(neg_scale, "neg_scale", 0.0, math.inf, hi_open=True)


def _perpendicular(neg: Tensor, pos: Tensor, dims: list[int]) -> Tensor:
    """``n - <n, p_hat> p_hat`` with ``p_hat = p / ||p||``; both vectors are power-of-two scaled first,
    so neither huge (1e20) nor tiny (1e-30) vectors overflow, underflow or count as zero."""
    pos_scaled, _ = pow2_scale(pos, dims)
    neg_scaled, neg_exponent = pow2_scale(neg, dims)
    norm = pos_scaled.norm(p=2, dim=dims, keepdim=True)
    p_hat = torch.where(norm > 0, pos_scaled / norm, torch.zeros_like(pos_scaled))
    along = (neg_scaled * p_hat).sum(dim=dims, keepdim=True)
    parallel = torch.ldexp(along * p_hat, neg_exponent)
    return neg - parallel


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
    with this per-sample form for batch 1.

    Args:
        cond (Tensor): the positive-prompt prediction, floating point, batch first.
        uncond (Tensor): the empty-prompt prediction, same shape.
        negative (Tensor): the negative-prompt prediction, same shape (required: ``TypeError`` for ``None``).
        scale (float | Tensor): ``w``, a finite real number or a tensor of shape ``()``, ``(1,)``, ``(B,)``.
        neg_scale (float): weight of ``n_perp``, a finite number ``>= 0``.
        dims (int | tuple[int, ...] | None): per-sample reduction dimensions; ``None``: all non-batch ones.

    Returns:
        Tensor: ``cond`` itself at ``scale == 1`` (ComfyUI still subtracts ``n_perp`` there); otherwise
        in ``cond``'s dtype, computed in float32 at least. Per-sample scale rows of exactly 1 are
        ``cond`` bit for bit.

    Edge cases: the projection is scale-invariant (power-of-two scaling), so vectors of size 1e20 give
    no NaN and vectors of size 1e-30 are not treated as zero; ``p = 0`` (no positive direction)
    gives ``n_perp = n``. Values are not inspected (no device sync); a result
    beyond the dtype's range saturates to ``+-finfo.max``.

    Example:
        >>> import torch
        >>> from guidance.ops import perp_neg
        >>> c, u, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
        >>> perp_neg(c, u, n, 2.0)
        tensor([[ 2., -2.]])
    """
    neg_scale = check_neg_scale(neg_scale)
    _check_pair(cond, uncond, min_ndim=1)
    check_tensor(negative, "negative", floating=True)
    check_same_shape(cond, negative, "cond", "negative")
    scale = _check_scale(scale, cond)
    dims_ = _sample_dims(cond, dims)
    if _is_one(scale):
        return cond
    dtype = _work_dtype(cond)
    c, u, n = cond.to(dtype), uncond.to(dtype), negative.to(dtype)
    pos, neg = c - u, n - u
    perp = _perpendicular(neg, pos, dims_)
    w = _as_batch_scale(scale, c)
    guided = u + w * (pos - neg_scale * perp)
    return _keep_cond_where_one(scale, cond, _saturate(guided.to(cond.dtype), cond, uncond, negative))
