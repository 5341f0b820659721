"""Norm-limited CFG: CFG-Renorm (Lumina-Image 2.0, arXiv 2503.21758) and ComfyUI's ``CFGNorm``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops._common import (
    Scale,
    _check_pair,
    _is_one,
    _keep_cond_where_one,
    _sample_dims,
    _vector_batch,
    _work_dtype,
)
from guidance.ops.cfg import cfg
from guidance.validation import check_choice as _check_choice
from guidance.validation import check_range as _check_range

RENORM_CONVENTIONS = ("paper", "diffusers")


def renorm(
    guided: Tensor,
    cond: Tensor,
    rho: float = 1.0,
    *,
    convention: str = "paper",
    dims: int | tuple[int, ...] | None = None,
) -> Tensor:
    """Cap ``||g||`` at ``rho ||c||``: ``g <- g min(1, rho ||c|| / ||g||)`` (CFG-Renorm).

    ``convention="paper"`` (default; Lumina-Image 2.0's code and ComfyUI's ``RenormCFG``): L2 norms
    per sample over ``dims`` (default all non-batch dims), only ever scaling down; ``rho = 0``
    disables it. ``"diffusers"`` (``Lumina2Pipeline(cfg_normalization=True)``): ``g ||c|| / ||g||``
    always (also scaling up), norms over the last dim only; ``rho`` must then be positive and is
    not used. A zero ``||g||`` leaves ``g`` unchanged.

    Example:
        >>> import torch
        >>> from guidance.ops import renorm
        >>> renorm(torch.tensor([[6.0, 8.0]]), torch.tensor([[3.0, 4.0]]), rho=1.0)
        tensor([[3., 4.]])
    """
    rho = _check_range(rho, "rho", 0.0, math.inf, hi_open=True)
    _check_choice(convention, "convention", RENORM_CONVENTIONS)
    _check_pair(guided, cond)
    if convention == "diffusers" and rho == 0:
        raise ValueError("`rho` must be > 0 with convention='diffusers' (it renormalises always).")
    if rho == 0:
        return guided
    dtype = _work_dtype(guided)
    g, c = guided.to(dtype), cond.to(dtype)
    dims_ = [-1] if convention == "diffusers" else _sample_dims(g, dims)
    g_norm = torch.linalg.vector_norm(g, dim=dims_, keepdim=True)
    target = torch.linalg.vector_norm(c, dim=dims_, keepdim=True)
    if convention == "paper":
        target = target * rho
    factor = target / torch.where(g_norm > 0, g_norm, torch.ones_like(g_norm))
    if convention == "paper":
        factor = torch.where(g_norm >= target, factor, torch.ones_like(factor))
    factor = torch.where(g_norm > 0, factor, torch.ones_like(factor))
    return (g * factor).to(guided.dtype)


@_vector_batch
def cfg_renorm(
    cond: Tensor,
    uncond: Tensor,
    scale: Scale,
    *,
    rho: float = 1.0,
    convention: str = "paper",
    dims: int | tuple[int, ...] | None = None,
) -> Tensor:
    """CFG-Renorm: :func:`guidance.ops.cfg` followed by :func:`renorm` (``||g|| <= rho ||c||``).

    Returns ``cond`` itself at ``scale == 1``.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_renorm
        >>> cfg_renorm(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]]), 4.0)
        tensor([[3., 4.]])
    """
    _check_range(rho, "rho", 0.0, math.inf, hi_open=True)
    _check_choice(convention, "convention", RENORM_CONVENTIONS)
    _check_pair(cond, uncond)
    if _is_one(scale):
        return cond
    guided = renorm(cfg(cond, uncond, scale), cond, rho, convention=convention, dims=dims)
    return _keep_cond_where_one(scale, cond, guided)


def cfg_norm(
    cond: Tensor,
    uncond: Tensor,
    scale: Scale,
    *,
    strength: float = 1.0,
    eps: float = 1e-8,
    dim: int = 1,
) -> Tensor:
    """ComfyUI's ``CFGNorm``: ``g k strength`` with ``k = clamp(||c|| / (||g|| + eps), 0, 1)``, ``g = cfg(c, u, w)``.

    The norms run over ``dim`` only (channels by default), so ``k`` is one number per position:
    every position's guided vector is shrunk to at most the conditional one's length. ComfyUI
    applies it to denoised predictions (the ``CFGNorm`` guider's default space). Returns ``cond``
    itself at ``scale == 1`` (ComfyUI still multiplies by ``strength k`` there).

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_norm
        >>> c, u = torch.tensor([[[3.0], [4.0]]]), torch.zeros(1, 2, 1)
        >>> cfg_norm(c, u, 2.0, eps=0.0)  # ||g|| = 10 > ||c|| = 5: back to length 5
        tensor([[[3.],
                 [4.]]])
    """
    strength = _check_range(strength, "strength", 0.0, math.inf, hi_open=True)
    eps = _check_range(eps, "eps", 0.0, math.inf, hi_open=True)
    _check_pair(cond, uncond)
    if not -cond.ndim <= dim < cond.ndim or cond.ndim < 2:
        raise ValueError(f"`dim` must be a dimension of a tensor with at least 2 dims, got {dim} for shape {tuple(cond.shape)}.")
    if _is_one(scale):
        return cond
    dtype = _work_dtype(cond)
    c = cond.to(dtype)
    guided = cfg(c, uncond.to(dtype), scale)
    c_norm = torch.linalg.vector_norm(c, dim=dim, keepdim=True)
    g_norm = torch.linalg.vector_norm(guided, dim=dim, keepdim=True)
    factor = (c_norm / (g_norm + eps)).clamp(0.0, 1.0)
    factor = torch.where(torch.isnan(factor), torch.ones_like(factor), factor)
    out = guided * factor * strength
    return _keep_cond_where_one(scale, cond, out.to(cond.dtype))
