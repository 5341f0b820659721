"""Normalized Attention Guidance, NAG (Chen et al. 2025, arXiv 2505.21179): negative guidance in attention space.

NAG does not combine predictions. Inside a cross-attention layer it combines two attention
outputs for the same queries: ``z_pos`` with the positive context (the prompt) and ``z_neg``
with the negative context (the negative prompt). Per token, with norms over the last
(feature) dimension:

1. extrapolate: ``z~ = s z+ - (s - 1) z-`` (``= z+ + (s - 1)(z+ - z-)``);
2. normalise: ``r = ||z~|| / ||z+||``; where ``r > tau``, ``z^ = z~ tau / r``, else ``z^ = z~``;
3. blend: ``z = alpha z^ + (1 - alpha) z+``.

Scale convention as the rest of the library and the NAG references: ``s = 1`` is off (``z~ = z+``),
and so is ``alpha = 0``; both return ``z_pos`` itself. ``s`` here is the official code's and
ComfyUI's ``nag_scale``.

Defaults ``tau = 2.5``, ``alpha = 0.25``, L1 norm: the official Flux pipeline's ``tau`` and
``alpha`` with the norm of the official UNet processor and of ComfyUI (the official Flux processor
uses L2: ``norm="l2"``). ComfyUI's node defaults are ``s = 5``, ``alpha = 0.5``, ``tau = 1.5``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops._common import _check_pair
from guidance.tensors import pow2_exponent, saturate, work_dtype
from guidance.validation import check_choice, check_finite, check_range

__all__ = ["NAG_NORMS", "normalized_attention_guidance", "check_nag_settings"]

NAG_NORMS = ("l1", "l2")


def check_nag_settings(scale: float, tau: float, alpha: float, norm: str) -> tuple[float, float, float, str]:
    """Validated ``(scale, tau, alpha, norm)`` of :func:`normalized_attention_guidance` (``ValueError``/``TypeError``).

    Example:
        >>> from guidance.ops.nag import check_nag_settings
        >>> check_nag_settings(5, 2.5, 0.25, "l1")
        (5.0, 2.5, 0.25, 'l1')
    """
    return (
        check_finite(scale, "scale"),
        check_range(tau, "tau", 0.0, math.inf, lo_open=True),
        check_range(alpha, "alpha", 0.0, 1.0),
        check_choice(norm, "norm", NAG_NORMS),
    )


def normalized_attention_guidance(
    z_pos: Tensor,
    z_neg: Tensor,
    scale: float = 5.0,
    *,
    tau: float = 2.5,
    alpha: float = 0.25,
    norm: str = "l1",
) -> Tensor:
    """NAG on one layer's attention outputs: extrapolate, cap the norm ratio at ``tau``, blend with ``alpha``.

    Args:
        z_pos (Tensor): attention output with the positive context, ``(..., tokens, features)``,
            floating point (the input of the layer's output projection).
        z_neg (Tensor): attention output with the negative context for the same queries, same shape.
        scale (float): NAG scale ``s``, any finite real; ``1`` is off (default 5, the paper's
            usual setting on Flux-schnell).
        tau (float): the largest allowed ratio ``||z~|| / ||z+||`` per token, ``> 0``
            (``inf``: no normalisation). Default 2.5.
        alpha (float): blend weight of the normalised ``z^`` in ``[0, 1]`` (``0``: off). Default 0.25.
        norm (str): ``"l1"`` (default) or ``"l2"``: the per-token norm over the last dimension.

    Returns:
        Tensor: the guided attention output, ``z_pos``'s dtype; ``z_pos`` itself where ``scale == 1``
        or ``alpha == 0``.

    Zero norms never give NaN: ``||z+|| = 0`` with ``||z~|| > 0`` gives ``z^ = 0`` (the ratio is
    infinite, capped to ``tau`` times zero), ``||z~|| = 0`` keeps ``z^ = 0``. Each token is scaled by
    a power of two before the norms (exact), and float16/bfloat16 are computed in float32, so the
    norms neither overflow nor underflow; finite inputs give finite outputs (saturating at the
    dtype's largest value where the exact result is beyond it).

    Example:
        >>> import torch
        >>> from guidance.ops import normalized_attention_guidance
        >>> z_pos, z_neg = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, -1.0]])
        >>> normalized_attention_guidance(z_pos, z_neg, 3.0, tau=10.0, alpha=1.0)  # 3 z+ - 2 z-
        tensor([[1., 5.]])
        >>> normalized_attention_guidance(z_pos, z_neg, 3.0, tau=2.0, alpha=1.0)  # ||z~||_1 capped at 2 * 2
        tensor([[0.6667, 3.3333]])
        >>> normalized_attention_guidance(z_pos, z_neg, 1.0) is z_pos  # s = 1: off
        True
    """
    _check_pair(z_pos, z_neg, ("z_pos", "z_neg"), min_ndim=1)
    scale, tau, alpha, norm = check_nag_settings(scale, tau, alpha, norm)
    if scale == 1.0 or alpha == 0.0:
        return z_pos
    dtype = work_dtype(z_pos)
    pos, neg = z_pos.to(dtype), z_neg.to(dtype)
    # One power of two per token for both inputs: exact, and keeps the norms in range.
    exponent = pow2_exponent(torch.maximum(pos.abs(), neg.abs()), [-1])
    pos, neg = torch.ldexp(pos, -exponent), torch.ldexp(neg, -exponent)
    guided = pos * scale - neg * (scale - 1.0)
    order = 1 if norm == "l1" else 2
    norm_pos = torch.linalg.vector_norm(pos, ord=order, dim=-1, keepdim=True)
    norm_guided = torch.linalg.vector_norm(guided, ord=order, dim=-1, keepdim=True)
    over = norm_guided > tau * norm_pos  # False where both are 0 (and for tau = inf)
    safe = torch.where(over, norm_guided, torch.ones_like(norm_guided))
    factor = torch.where(over, tau * norm_pos / safe, torch.ones_like(safe))
    blended = (guided * factor) * alpha + pos * (1.0 - alpha)
    out = torch.ldexp(blended, exponent).to(z_pos.dtype)
    return saturate(out, z_pos, z_neg)
