"""Guidance rescale (Lin et al. 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from guidance.ops._common import Scale, _check_pair, _is_one, _keep_cond_where_one, _sample_dims, _work_dtype
from guidance.ops.cfg import cfg
from guidance.validation import check_range as _check_range


def rescale(
    guided: Tensor, cond: Tensor, phi: float = 0.7, dims: int | tuple[int, ...] | None = None
) -> Tensor:
    """Guidance rescale (Lin et al. 2024): ``phi * guided * std(cond) / std(guided) + (1 - phi) * guided``.

    The same float operations in the same order as diffusers' ``rescale_noise_cfg`` (unbiased std over
    all non-batch dims), so float32 results are bit-identical to it. ``phi = 0`` returns ``guided``
    itself. A sample whose ``std(guided)`` is 0 (or undefined) is left unscaled instead of becoming NaN.

    Example:
        >>> import torch
        >>> from guidance.ops import rescale
        >>> g, c = torch.tensor([[4.0, -4.0]]), torch.tensor([[1.0, -1.0]])
        >>> rescale(g, c, phi=1.0)
        tensor([[ 1., -1.]])
    """
    phi = _check_range(phi, "phi", 0.0, 1.0)
    _check_pair(guided, cond)
    if phi == 0.0:
        return guided
    dims_ = _sample_dims(guided, dims)
    dtype = _work_dtype(guided)
    g, c = guided.to(dtype), cond.to(dtype)
    ratio = c.std(dim=dims_, keepdim=True) / g.std(dim=dims_, keepdim=True)
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    out = phi * (g * ratio) + (1 - phi) * g
    return out.to(guided.dtype)


def cfg_rescaled(
    cond: Tensor, uncond: Tensor, scale: Scale, phi: float = 0.7, dims: int | tuple[int, ...] | None = None
) -> Tensor:
    """CFG followed by :func:`rescale` towards ``std(cond)``: diffusers' ``guidance_rescale=phi``.

    Returns ``cond`` itself at ``scale == 1`` (diffusers' pipelines skip rescaling when they skip CFG).

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_rescaled
        >>> c, u = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 0.0]])
        >>> cfg_rescaled(c, u, 4.0, phi=0.5)
        tensor([[ 2.5000, -2.5000]])
    """
    _check_range(phi, "phi", 0.0, 1.0)
    if _is_one(scale):
        _check_pair(cond, uncond)
        return cond
    guided = rescale(cfg(cond, uncond, scale), cond, phi, dims)
    return _keep_cond_where_one(scale, cond, guided)
