"""Beta-CFG: guidance scaled by a beta-distribution weight over time."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops._common import (
    Scale,
    _as_batch_scale,
    _check_pair,
    _check_scale,
    _combine,
    _float64_scalars,
    _is_one,
    _keep_cond_where_one,
    _sample_dims,
    _saturate,
    _vector_batch,
    _work_dtype,
)
from guidance.tensors import pow2_scale, saturate
from guidance.validation import check_range


def check_gamma(gamma: float) -> float:
    """beta-CFG's norm exponent ``gamma``: a finite number ``>= 0`` (shared by the op and the guider).

    Args:
        gamma (float): the value to check.

    Example:
        >>> from guidance.ops.beta import check_gamma
        >>> check_gamma(1)
        1.0
    """
    return check_range(gamma, "gamma", 0.0, math.inf, hi_open=True)


def _normalised_difference(diff: Tensor, gamma: float, dims: list[int]) -> Tensor:
    """``d / ||d||^gamma`` as ``(d / ||d||) * ||d||^(1 - gamma)``: the unit vector from a power-of-two
    scaled copy (exact) and the magnitude in float64 logs, so it is finite wherever the exact result
    is and a tiny ``d`` (1e-30) is not mistaken for zero. ``d = 0`` gives 0."""
    scaled, exponent = pow2_scale(diff, dims)
    norm = scaled.norm(p=2, dim=dims, keepdim=True)
    unit = scaled / norm
    log2_norm = torch.log2(_float64_scalars(norm)) + _float64_scalars(exponent)
    magnitude = saturate(torch.exp2((1.0 - gamma) * log2_norm).to(device=diff.device, dtype=diff.dtype))
    return torch.where(norm > 0, unit * magnitude, torch.zeros_like(diff))


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
    (``u + w * beta_pdf(t) * (c - u) / ||c - u||^gamma``).

    Args:
        cond (Tensor): the conditional prediction, floating point, batch first (``(B,)``: one value per sample).
        uncond (Tensor): the unconditional prediction, same shape.
        scale (float | Tensor): ``w``, a finite real number or a tensor of shape ``()``, ``(1,)``, ``(B,)``.
        gamma (float): the norm exponent, a finite number ``>= 0``; ``0`` is plain CFG (same bits as
            :func:`~guidance.ops.cfg`), ``1`` (default) normalises the difference to unit length.
        dims (int | tuple[int, ...] | None): per-sample reduction dimensions; ``None``: all non-batch ones.

    Returns:
        Tensor: ``cond`` itself at ``scale == 1``; otherwise in ``cond``'s dtype, computed in float32
        at least. Per-sample scale rows of exactly 1 are ``cond`` bit for bit.

    Edge cases: ``c = u`` gives ``u``, not NaN; the norm is scale-invariant (a difference of size
    1e-30 is normalised like one of size 1, and ``||d||^gamma`` never underflows to 0 or overflows
    where the result is representable). Values are not inspected (no device sync);
    a result beyond the dtype's range saturates to ``+-finfo.max``.

    Example:
        >>> import torch
        >>> from guidance.ops import beta_cfg
        >>> beta_cfg(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]]), 2.0)
        tensor([[1.2000, 1.6000]])
        >>> beta_cfg(torch.tensor([[3e-30, 4e-30]]), torch.tensor([[0.0, 0.0]]), 2.0)  # not "zero"
        tensor([[1.2000, 1.6000]])
    """
    gamma = check_gamma(gamma)
    _check_pair(cond, uncond, min_ndim=1)
    scale = _check_scale(scale, cond)
    dims_ = _sample_dims(cond, dims)
    if _is_one(scale):
        return cond
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)
    w = _as_batch_scale(scale, c)
    if gamma == 0.0:
        guided = _combine(c, u, w)
    else:
        guided = u + w * _normalised_difference(c - u, gamma, dims_)
    return _keep_cond_where_one(scale, cond, _saturate(guided.to(cond.dtype), cond, uncond))
