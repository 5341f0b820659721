"""Tangential damping CFG, TCFG ("TCFG: Tangential Damping Classifier-free Guidance", CVPR 2025, arXiv 2503.18137)."""

from __future__ import annotations

import torch
from torch import Tensor

from guidance.ops._common import (
    Scale,
    _as_batch_scale,
    _check_pair,
    _float64_device,
    _is_one,
    _keep_cond_where_one,
    _work_dtype,
)


def tangential_damping(cond: Tensor, uncond: Tensor) -> Tensor:
    """``uncond`` projected on the top right-singular vector of the per-sample ``2 x D`` matrix ``[c; u]``.

    The component of ``u`` along the second singular direction (the "tangential" part that
    disagrees with ``c``) is dropped: ``u' = <u, v1> v1``. Computed in float64 from the 2 x 2 Gram
    matrix ``[[c.c, c.u], [u.c, u.u]]``: its top eigenvector ``e`` gives ``v1 = (e_0 c + e_1 u) /
    sqrt(lambda_1)``, so ``u' = a c + b u`` with two scalars per sample (no SVD of a ``2 x D``
    matrix, the same vector up to rounding; its sign does not matter). All-zero samples give zeros.

    Example:
        >>> import torch
        >>> from guidance.ops import tangential_damping
        >>> tangential_damping(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
        tensor([[1.1708, 0.7236]])
    """
    _check_pair(cond, uncond)
    batch = cond.shape[0] if cond.ndim > 1 else 1
    device64 = _float64_device(cond)
    c = cond.reshape(batch, -1).to(device=device64, dtype=torch.float64)
    u = uncond.reshape(batch, -1).to(device=device64, dtype=torch.float64)
    cc, cu, uu = (c * c).sum(-1), (c * u).sum(-1), (u * u).sum(-1)
    gram = torch.stack([torch.stack([cc, cu], -1), torch.stack([cu, uu], -1)], -2)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    top = eigenvalues[:, 1]
    e0, e1 = eigenvectors[:, 0, 1], eigenvectors[:, 1, 1]
    coef = torch.where(top > 0, (e0 * cu + e1 * uu) / torch.where(top > 0, top, 1.0), 0.0)
    projected = (coef * e0).unsqueeze(-1) * c + (coef * e1).unsqueeze(-1) * u
    return projected.to(device=uncond.device, dtype=_work_dtype(uncond)).reshape(uncond.shape)


def tcfg(cond: Tensor, uncond: Tensor, scale: Scale) -> Tensor:
    """TCFG: ``g = u' + w (c - u')`` with ``u' =`` :func:`tangential_damping` ``(c, u)``.

    The paper's form and diffusers' ``TangentialClassifierFreeGuidance`` (on the raw prediction;
    ComfyUI's ``TCFG`` node projects ``x - D`` instead, which is the same for eps and flow models).
    diffusers' ``use_original_formulation=True`` with scale ``s`` is this function at ``w = s + 1``.
    Returns ``cond`` itself at ``scale == 1``; the result has ``cond``'s dtype.

    Example:
        >>> import torch
        >>> from guidance.ops import tcfg
        >>> c, u = torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]])
        >>> tcfg(c, u, 5.0)  # u parallel to c: nothing is damped, plain CFG
        tensor([[2., 0.]])
    """
    _check_pair(cond, uncond)
    if _is_one(scale):
        return cond
    dtype = _work_dtype(cond)
    c = cond.to(dtype)
    damped = tangential_damping(cond, uncond).to(dtype)
    guided = damped + _as_batch_scale(scale, c) * (c - damped)
    return _keep_cond_where_one(scale, cond, guided.to(cond.dtype))
