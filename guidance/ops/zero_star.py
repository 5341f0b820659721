"""CFG-Zero* (Fan et al. 2025): optimised scale and zero-init."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops._common import (
    Scale,
    _check_pair,
    _check_scale,
    _float64_scalars,
    _is_one,
    _keep_cond_where_one,
    _sample_dims,
    _saturate,
    _vector_batch,
    _work_dtype,
)
from guidance.ops.cfg import cfg
from guidance.tensors import per_sample, pow2_scale
from guidance.validation import check_int, check_range


def check_eps(eps: float) -> float:
    """CFG-Zero*'s ``eps``: a finite number ``>= 0`` (shared by the op and the guider).

    Args:
        eps (float): the value to check.

    Example:
        >>> from guidance.ops.zero_star import check_eps
        >>> check_eps(1e-8)
        1e-08
    """
    return check_range(eps, "eps", 0.0, math.inf, hi_open=True)


def zero_init(step: int, zero_init_steps: int) -> bool:
    """CFG-Zero*'s zero-init rule: the output is ``zeros_like(cond)`` at steps ``0 .. zero_init_steps - 1``.

    The one home of the rule (the :class:`~guidance.guiders.CFGZeroStar` guider and the diffusers
    components use it). As in diffusers' ``ClassifierFreeZeroStarGuidance``, it holds whatever the
    guidance scale, and the unconditional prediction is not needed there.

    Args:
        step (int): the denoising step, an integer ``>= 0``.
        zero_init_steps (int): how many first steps output zeros, an integer ``>= 0``.

    Example:
        >>> from guidance.ops.zero_star import zero_init
        >>> [zero_init(step, 2) for step in range(4)]
        [True, True, False, False]
    """
    return check_int(step, "step", minimum=0) < check_int(zero_init_steps, "zero_init_steps", minimum=0)


def _alpha_rescue(c: Tensor, u: Tensor, eps: float, dims: list[int]) -> Tensor:
    """``<c, u> / (||u||^2 + eps)`` from power-of-two-scaled copies, with float64 bookkeeping."""
    sc, ec = pow2_scale(c, dims)
    su, eu = pow2_scale(u, dims)
    dot = _float64_scalars((sc * su).sum(dim=dims, keepdim=True))
    squared = _float64_scalars((su * su).sum(dim=dims, keepdim=True))
    ec, eu = ec.to(dot.device), eu.to(dot.device)
    alpha = torch.ldexp(dot, ec - eu) / (squared + torch.ldexp(torch.full_like(squared, eps), -2 * eu))
    return alpha.to(device=c.device, dtype=c.dtype)


@_vector_batch
def zero_star_alpha(
    cond: Tensor, uncond: Tensor, eps: float = 1e-8, dims: int | tuple[int, ...] | None = None
) -> Tensor:
    """CFG-Zero*'s per-sample optimised scale ``<c, u> / (||u||^2 + eps)``, shaped ``(B, 1, ..., 1)``.

    Args:
        cond (Tensor): the conditional prediction, floating point, batch first (``(B,)``: one value per sample).
        uncond (Tensor): the unconditional prediction, same shape.
        eps (float): added to ``||u||^2``, a finite number ``>= 0`` (diffusers: ``1e-8``).
        dims (int | tuple[int, ...] | None): per-sample reduction dimensions; ``None``: all non-batch ones.

    Returns:
        Tensor: ``alpha`` in ``cond``'s dtype, computed in float32 at least with diffusers'
        ``cfg_zero_star_scale`` operations (bit-identical). ``eps`` makes it shrink towards 0 when
        ``||u||^2`` is comparable to ``eps`` (diffusers' definition, kept). Where the float32 sums
        overflow (values ~1e20) alpha is recomputed from power-of-two-scaled copies, so it stays
        right; ``u = 0`` with ``eps = 0`` gives 0, not NaN. Values are not inspected (no device sync).

    Example:
        >>> import torch
        >>> from guidance.ops import zero_star_alpha
        >>> zero_star_alpha(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
        tensor([[2.]])
    """
    eps = check_eps(eps)
    _check_pair(cond, uncond, min_ndim=1)
    dims_ = _sample_dims(cond, dims)
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)
    if dims is None:  # diffusers' exact operations
        cf, uf = c.flatten(1), u.flatten(1)
        alpha = torch.sum(cf * uf, dim=1, keepdim=True) / (torch.sum(uf**2, dim=1, keepdim=True) + eps)
        alpha = per_sample(alpha, cond)
    else:
        alpha = torch.sum(c * u, dim=dims_, keepdim=True) / (torch.sum(u**2, dim=dims_, keepdim=True) + eps)
    alpha = torch.where(torch.isfinite(alpha), alpha, _alpha_rescue(c, u, eps, dims_))
    alpha = torch.where(torch.isnan(alpha), torch.zeros_like(alpha), alpha)
    return _saturate(alpha.to(cond.dtype), alpha)


def cfg_zero_star(
    cond: Tensor,
    uncond: Tensor,
    scale: Scale,
    *,
    eps: float = 1e-8,
    dims: int | tuple[int, ...] | None = None,
) -> Tensor:
    """CFG-Zero* (Fan et al. 2025): ``a u + w (c - a u)`` with ``a`` = :func:`zero_star_alpha`.

    Zero-init (output 0 for the first steps) is a property of the sampling run, not of one
    combination: the :class:`~guidance.guiders.CFGZeroStar` guider does it (rule: :func:`zero_init`).

    Args:
        cond (Tensor): the conditional prediction, floating point, batch first.
        uncond (Tensor): the unconditional prediction, same shape.
        scale (float | Tensor): ``w``, a finite real number or a tensor of shape ``()``, ``(1,)``, ``(B,)``.
        eps (float): see :func:`zero_star_alpha`.
        dims (int | tuple[int, ...] | None): per-sample reduction dimensions; ``None``: all non-batch ones.

    Returns:
        Tensor: ``cond`` itself at ``scale == 1``; otherwise the same operations as diffusers'
        ``ClassifierFreeZeroStarGuidance`` (bit-identical in float32), in ``cond``'s dtype. Per-sample
        scale rows of exactly 1 are ``cond`` bit for bit. The combine is :func:`~guidance.ops.cfg`'s
        (finite wherever the exact result is representable).

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_zero_star
        >>> cfg_zero_star(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 0.0]]), 2.0)
        tensor([[2., 2.]])
    """
    eps = check_eps(eps)
    _check_pair(cond, uncond, min_ndim=1)
    scale = _check_scale(scale, cond)
    if _is_one(scale):
        return cond
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)
    guided = cfg(c, u * zero_star_alpha(c, u, eps=eps, dims=dims), scale)
    return _keep_cond_where_one(scale, cond, _saturate(guided.to(cond.dtype), cond, uncond))
