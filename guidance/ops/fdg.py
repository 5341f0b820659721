"""Frequency-decoupled guidance, FDG (arXiv 2506.19713): CFG per level of a Laplacian pyramid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from guidance.ops._common import Scale, _check_pair, _work_dtype
from guidance.ops.projection import project
from guidance.validation import check_finite as _check_finite
from guidance.validation import check_int as _check_int

# Burt & Adelson's 5-tap binomial filter [1, 4, 6, 4, 1] / 16, as an outer product.
_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x: Tensor) -> Tensor:
    """5 x 5 binomial blur per channel, borders mirrored (``reflect``; ``replicate`` below 3 pixels)."""
    taps = torch.tensor(_TAPS, dtype=x.dtype, device=x.device)
    kernel = (taps[:, None] * taps[None, :] / 256.0).expand(x.shape[1], 1, 5, 5)
    mode = "reflect" if min(x.shape[-2:]) >= 3 else "replicate"
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode=mode), kernel, groups=x.shape[1])


def _down(x: Tensor) -> Tensor:
    return F.interpolate(_blur(x), size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear", align_corners=False)


def _up(x: Tensor) -> Tensor:
    return _blur(F.interpolate(x, size=(x.shape[-2] * 2, x.shape[-1] * 2), mode="bilinear", align_corners=False))


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """Laplacian pyramid of a ``(B, C, H, W)`` tensor: ``levels`` bands, finest first, the last one low-pass.

    Gaussian levels are made by a 5 x 5 binomial blur and a bilinear halving; band ``k`` is
    Gaussian level ``k`` minus the blurred bilinear doubling of level ``k + 1`` (kornia's
    ``build_laplacian_pyramid`` on inputs it does not pad). Sides must be divisible by
    ``2 ** (levels - 1)``: see :func:`fdg` for other sizes. :func:`collapse_pyramid` inverts it exactly.

    Example:
        >>> import torch
        >>> from guidance.ops import collapse_pyramid, laplacian_pyramid
        >>> x = torch.randn(1, 3, 16, 16)
        >>> [tuple(b.shape[-2:]) for b in laplacian_pyramid(x, 3)]
        [(16, 16), (8, 8), (4, 4)]
        >>> torch.allclose(collapse_pyramid(laplacian_pyramid(x, 3)), x, atol=1e-6)
        True
    """
    levels = _check_int(levels, "levels", minimum=1)
    if x.ndim != 4:
        raise ValueError(f"`x` must be a (B, C, H, W) tensor, got shape {tuple(x.shape)}.")
    stride = 2 ** (levels - 1)
    if x.shape[-2] % stride or x.shape[-1] % stride:
        raise ValueError(
            f"A {levels}-level pyramid needs sides divisible by {stride}, got {tuple(x.shape[-2:])}."
        )
    gaussian = [x]
    for _ in range(levels - 1):
        gaussian.append(_down(gaussian[-1]))
    bands = [fine - _up(coarse) for fine, coarse in zip(gaussian[:-1], gaussian[1:], strict=True)]
    return [*bands, gaussian[-1]]


def collapse_pyramid(pyramid: Sequence[Tensor]) -> Tensor:
    """Rebuild the tensor from a :func:`laplacian_pyramid`: upsample-and-add from the coarsest band."""
    image = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        image = _up(image) + band
    return image


def _padded(x: Tensor, stride: int) -> Tensor:
    pad_h, pad_w = -x.shape[-2] % stride, -x.shape[-1] % stride
    if not (pad_h or pad_w):
        return x
    mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def fdg(
    cond: Tensor,
    uncond: Tensor,
    scales: Sequence[Scale],
    *,
    parallel_weights: Sequence[float] | float | None = None,
) -> Tensor:
    """Frequency-decoupled guidance: CFG with its own scale on every band of a Laplacian pyramid.

    ``c`` and ``u`` are split into ``len(scales)`` bands (:func:`laplacian_pyramid`); on band ``k``,
    ``d_k = c_k - u_k``, optionally ``d_k <- p_k d_par + d_perp`` (its part parallel to ``c_k``
    weighted by ``parallel_weights[k]``, projected per sample in float64), and ``g_k = u_k + w_k d_k``;
    the bands are then collapsed. ``scales`` run from the finest band to the coarsest (diffusers'
    order; the paper's SDXL setting is ``(10, 5)``: high frequencies 10, low 5).

    Inputs are ``(B, C, H, W)``, or any ``(B, ..., H, W)`` (the middle dims are folded into
    channels). Sides not divisible by ``2 ** (levels - 1)`` are padded at the bottom/right by
    mirroring and the result cropped back (diffusers' kornia pyramid pads to a power of two there
    and returns the padded size). Same numbers as diffusers' ``FrequencyDecoupledGuidance`` where it
    does not pad. Returns ``cond`` itself when every scale is 1.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg, fdg
        >>> c, u = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
        >>> torch.allclose(fdg(c, u, [3.0, 3.0]), cfg(c, u, 3.0), atol=1e-5)  # equal scales: CFG
        True
    """
    _check_pair(cond, uncond)
    levels = len(scales)
    if levels < 1:
        raise ValueError("`scales` must hold at least one scale (one per pyramid level).")
    scales = [_check_finite(s, f"scales[{k}]") for k, s in enumerate(scales)]
    if parallel_weights is None or not isinstance(parallel_weights, Sequence):
        weight = 1.0 if parallel_weights is None else parallel_weights
        parallel_weights = [weight] * levels
    if len(parallel_weights) != levels:
        raise ValueError(
            f"`parallel_weights` must have one weight per level ({levels}), got {len(parallel_weights)}."
        )
    parallel_weights = [_check_finite(p, f"parallel_weights[{k}]") for k, p in enumerate(parallel_weights)]
    if cond.ndim < 3:
        raise ValueError(f"`cond` must have two trailing spatial dims (B, ..., H, W), got shape {tuple(cond.shape)}.")
    if all(s == 1 for s in scales):
        return cond
    dtype = _work_dtype(cond)
    height, width = cond.shape[-2:]

    def bands(x: Tensor) -> list[Tensor]:
        folded = x.to(dtype).reshape(x.shape[0], -1, height, width)
        return laplacian_pyramid(_padded(folded, 2 ** (levels - 1)), levels)

    guided = []
    for c_k, u_k, w_k, p_k in zip(bands(cond), bands(uncond), scales, parallel_weights, strict=True):
        if w_k == 1:
            guided.append(c_k)
            continue
        shift = c_k - u_k
        if not math.isclose(p_k, 1.0):
            parallel, orthogonal = project(shift, c_k)
            shift = p_k * parallel + orthogonal
        guided.append(u_k + w_k * shift)
    out = collapse_pyramid(guided)[..., :height, :width]
    return out.reshape(cond.shape).to(cond.dtype)
