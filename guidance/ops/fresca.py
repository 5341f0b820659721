"""FreSca ("FreSca: Scaling in Frequency Space Enhances Diffusion Models"): the guidance direction rescaled per frequency."""

from __future__ import annotations

import torch
from torch import Tensor

from guidance.ops._common import (
    Scale,
    _as_batch_scale,
    _check_pair,
    _is_one,
    _keep_cond_where_one,
    _work_dtype,
)
from guidance.validation import check_choice as _check_choice
from guidance.validation import check_finite as _check_finite
from guidance.validation import check_int as _check_int

FRESCA_CONVENTIONS = ("clamped", "comfyui")


def frequency_scale(
    x: Tensor,
    scale_low: float = 1.0,
    scale_high: float = 1.25,
    freq_cutoff: int = 20,
    *,
    convention: str = "clamped",
) -> Tensor:
    """Scale the low and high spatial frequencies of ``x`` (last two dims) by different factors.

    FFT over the last two dims (float32 at least), zero frequency shifted to the centre
    ``(H // 2, W // 2)``; frequencies with index in ``[centre - freq_cutoff, centre + freq_cutoff)``
    along both axes (a centred box) are multiplied by ``scale_low``, all others by ``scale_high``;
    the real part of the inverse FFT is returned in ``x``'s dtype.

    ``convention="clamped"`` (default) clips the box to the tensor. ``"comfyui"`` reproduces
    ComfyUI's slice, whose start wraps around when ``freq_cutoff > size // 2`` (then only the rows
    from ``size + centre - freq_cutoff`` on are "low"); the two agree whenever
    ``freq_cutoff <= min(H, W) // 2``.

    Example:
        >>> import torch
        >>> from guidance.ops import frequency_scale
        >>> x = torch.randn(1, 1, 8, 8)
        >>> torch.allclose(frequency_scale(x, 2.0, 2.0, 2), 2 * x, atol=1e-5)  # equal factors: a plain scaling
        True
    """
    scale_low, scale_high, freq_cutoff = _check_args(scale_low, scale_high, freq_cutoff, convention)
    if x.ndim < 2:
        raise ValueError(f"`x` must have two trailing spatial dims, got shape {tuple(x.shape)}.")
    dtype = _work_dtype(x)
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.to(dtype), dim=(-2, -1)), dim=(-2, -1))
    height, width = x.shape[-2:]
    mask = torch.full((height, width), scale_high, dtype=dtype, device=x.device)
    rows = _box(height // 2, freq_cutoff, convention)
    cols = _box(width // 2, freq_cutoff, convention)
    mask[rows, cols] = scale_low
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(x.dtype)


def _check_args(scale_low: float, scale_high: float, freq_cutoff: int, convention: str) -> tuple[float, float, int]:
    _check_choice(convention, "convention", FRESCA_CONVENTIONS)
    return (
        _check_finite(scale_low, "scale_low"),
        _check_finite(scale_high, "scale_high"),
        _check_int(freq_cutoff, "freq_cutoff", minimum=0),
    )


def _box(centre: int, half_width: int, convention: str) -> slice:
    start = centre - half_width
    if convention == "clamped":
        start = max(start, 0)
    return slice(start, centre + half_width)


def fresca(
    cond: Tensor,
    uncond: Tensor,
    scale: Scale,
    *,
    scale_low: float = 1.0,
    scale_high: float = 1.25,
    freq_cutoff: int = 20,
    convention: str = "clamped",
) -> Tensor:
    """FreSca: ``g = u + w F(c - u)``, ``F`` = :func:`frequency_scale` (ComfyUI's ``FreSca`` node).

    Linear in ``c - u``, so the prediction space (eps, v, x0) does not matter. ComfyUI's node
    defaults: ``scale_low=1.0, scale_high=1.25, freq_cutoff=20`` (in latent pixels: on small
    latents a cutoff of ``min(H, W) // 2`` or more makes every frequency "low", i.e. CFG at
    ``w * scale_low``). Returns ``cond`` itself at ``scale == 1`` (ComfyUI filters there too).

    Example:
        >>> import torch
        >>> from guidance.ops import cfg, fresca
        >>> c, u = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
        >>> torch.allclose(fresca(c, u, 3.0, scale_high=1.0), cfg(c, u, 3.0), atol=1e-5)
        True
    """
    _check_args(scale_low, scale_high, freq_cutoff, convention)
    _check_pair(cond, uncond)
    if _is_one(scale):
        return cond
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)
    filtered = frequency_scale(c - u, scale_low, scale_high, freq_cutoff, convention=convention)
    guided = u + _as_batch_scale(scale, c) * filtered
    return _keep_cond_where_one(scale, cond, guided.to(cond.dtype))
