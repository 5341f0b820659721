"""Guidance rescale (Lin et al. 2024)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops._common import (
    Scale,
    _check_pair,
    _check_scale,
    _is_one,
    _keep_cond_where_one,
    _sample_dims,
    _saturate,
    _vector_batch,
    _work_dtype,
)
from guidance.ops.cfg import cfg
from guidance.tensors import pow2_exponent, pow2_scale
from guidance.validation import check_range


def _check_phi(phi: float) -> float:
    return check_range(phi, "phi", 0.0, 1.0)


def _std(x: Tensor, dims: list[int]) -> Tensor:
    """Unbiased per-sample std; power-of-two scaled so the sum of squares cannot overflow/underflow."""
    scaled, exponent = pow2_scale(x, dims)
    return torch.ldexp(scaled.std(dim=dims, keepdim=True), exponent)


@_vector_batch
def rescale(guided: Tensor, cond: Tensor, phi: float = 0.7, dims: int | tuple[int, ...] | None = None) -> Tensor:
    """Guidance rescale (Lin et al. 2024): ``phi * guided * std(cond) / std(guided) + (1 - phi) * guided``.

    Args:
        guided (Tensor): the guided prediction, floating point, batch first.
        cond (Tensor): the conditional prediction, same shape.
        phi (float): rescale strength in ``[0, 1]``; ``0`` returns ``guided`` itself.
        dims (int | tuple[int, ...] | None): per-sample reduction dimensions (never the batch
            dimension); ``None``: all non-batch dimensions.

    Returns:
        Tensor: the rescaled prediction in ``guided``'s dtype, computed in float32 at least. The same
        float operations in the same order as diffusers' ``rescale_noise_cfg`` (unbiased std), so
        float32 results are bit-identical to it; the stds are computed on power-of-two-scaled
        copies (exact), so they neither overflow (values ~1e20) nor underflow (~1e-30).

    Edge cases: a sample whose ``std(guided)`` is 0 or undefined (constant, or a single element,
    e.g. ``(B,)`` inputs: one value per sample) is returned unscaled, bit for bit; samples never
    influence each other. Values are not inspected (no device sync); NaN propagates;
    a result beyond the dtype's range saturates to ``+-finfo.max``.

    Example:
        >>> import torch
        >>> from guidance.ops import rescale
        >>> g, c = torch.tensor([[4.0, -4.0]]), torch.tensor([[1.0, -1.0]])
        >>> rescale(g, c, phi=1.0)
        tensor([[ 1., -1.]])
    """
    phi = _check_phi(phi)
    _check_pair(guided, cond, ("guided", "cond"), min_ndim=1)
    dims_ = _sample_dims(guided, dims)
    if phi == 0.0 or math.prod(guided.shape[d] for d in dims_) < 2:
        return guided  # no rescale, or one value per sample: no std to match
    dtype = _work_dtype(guided)
    g, c = guided.to(dtype), cond.to(dtype)
    ratio = _std(c, dims_) / _std(g, dims_)
    out = phi * (g * ratio) + (1 - phi) * g
    return _saturate(torch.where(torch.isfinite(ratio), out, g).to(guided.dtype), guided, cond)


def cfg_rescaled(
    cond: Tensor, uncond: Tensor, scale: Scale, phi: float = 0.7, dims: int | tuple[int, ...] | None = None
) -> Tensor:
    """CFG followed by :func:`rescale` towards ``std(cond)``: diffusers' ``guidance_rescale=phi``.

    Args:
        cond (Tensor): the conditional prediction, floating point, batch first.
        uncond (Tensor): the unconditional prediction, same shape.
        scale (float | Tensor): ``w``, a finite real number or a tensor of shape ``()``, ``(1,)``, ``(B,)``
            (values not checked, see :mod:`guidance.ops.cfg`).
        phi (float): rescale strength in ``[0, 1]``.
        dims (int | tuple[int, ...] | None): per-sample reduction dimensions; ``None``: all non-batch ones.

    Returns:
        Tensor: ``cond`` itself at ``scale == 1`` (diffusers' pipelines skip rescaling when they skip
        CFG); otherwise in ``cond``'s dtype. Half-precision inputs are combined and rescaled in
        float32 and rounded once, and both steps run on power-of-two-scaled copies (exact), so the
        intermediate ``u + w (c - u)`` cannot overflow where the rescaled result is representable.
        Per-sample scale rows of exactly 1 are ``cond`` bit for bit.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_rescaled
        >>> c, u = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 0.0]])
        >>> cfg_rescaled(c, u, 4.0, phi=0.5)
        tensor([[ 2.5000, -2.5000]])
    """
    phi = _check_phi(phi)
    _check_pair(cond, uncond, min_ndim=1)
    scale = _check_scale(scale, cond)
    _sample_dims(cond, dims)
    if _is_one(scale):
        return cond
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)
    dims_ = _sample_dims(c, dims)
    if not dims_:  # (B,) inputs: one value per sample, nothing to rescale
        guided = cfg(c, u, scale)
    else:
        # Both steps are homogeneous of degree 1: run them at unit magnitude (power-of-two scaling
        # is exact, so the bits are unchanged wherever nothing overflows) so that u + w (c - u)
        # cannot overflow on the way to a representable result.
        exponent = pow2_exponent(torch.maximum(c.abs(), u.abs()), dims_)
        c, u = torch.ldexp(c, -exponent), torch.ldexp(u, -exponent)
        guided = torch.ldexp(rescale(cfg(c, u, scale), c, phi, dims=dims), exponent)
    return _keep_cond_where_one(scale, cond, _saturate(guided.to(cond.dtype), cond, uncond))
