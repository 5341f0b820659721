"""Perturbed conditions for guidance without an unconditional model: ICG and TSG.

Sadat, Kansy, Hilliges, Weber, "No Training, No Problem: Rethinking Classifier-Free Guidance for
Diffusion Models" (ICLR 2025, arXiv 2407.02687). Both combine like CFG,
``g = D_ref + w (D - D_ref)``; what differs is the reference prediction ``D_ref``:

* ICG: the same network under a condition drawn independently of the sample (a random class
  label, or random embeddings with the statistics of the real ones);
* TSG: the conditional network with a noisy time-step embedding.

These functions draw the perturbed inputs; they never touch torch's global RNG (pass a
``torch.Generator``, or a ``noise`` tensor).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops._common import _sample_dims, _work_dtype
from guidance.tensors import per_sample
from guidance.validation import check_bool as _check_bool
from guidance.validation import check_int as _check_int
from guidance.validation import check_range as _check_range
from guidance.validation import check_same_shape as _check_same_shape
from guidance.validation import check_tensor as _check_tensor


def _randn(like: Tensor, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=dtype).to(like.device)


def random_embedding_like(
    embeds: Tensor, *, generator: torch.Generator | None = None, match_std: bool = True
) -> Tensor:
    """Gaussian embeddings shaped like ``embeds``, independent of the sample (ICG with text conditions).

    ``n ~ N(0, I)``, multiplied per sample by ``std(embeds)`` over its non-batch dims when
    ``match_std`` (the paper's "Gaussian noise scaled to the embedding's std"). Returned in
    ``embeds``' dtype. Draws from ``generator`` (whose device decides where), never the global RNG
    when one is given.

    Example:
        >>> import torch
        >>> from guidance.ops import random_embedding_like
        >>> e = 3.0 * torch.randn(2, 77, 64)
        >>> r = random_embedding_like(e, generator=torch.Generator().manual_seed(0))
        >>> r.shape, round(float(r.std()) / 3.0, 1)
        (torch.Size([2, 77, 64]), 1.0)
    """
    _check_tensor(embeds, "embeds", floating=True)
    match_std = _check_bool(match_std, "match_std")
    dtype = _work_dtype(embeds)
    noise = _randn(embeds, generator, dtype)
    if match_std and embeds.ndim > 1:
        noise = noise * embeds.to(dtype).std(dim=_sample_dims(embeds, None), keepdim=True)
    return noise.to(embeds.dtype)


def random_labels_like(
    labels: Tensor, num_classes: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Class labels drawn uniformly from ``[0, num_classes)``, shaped like ``labels`` (ICG for class models).

    Example:
        >>> import torch
        >>> from guidance.ops import random_labels_like
        >>> r = random_labels_like(torch.zeros(1000, dtype=torch.long), 10, generator=torch.Generator().manual_seed(0))
        >>> int(r.min()), int(r.max()), r.dtype
        (0, 9, torch.int64)
    """
    _check_tensor(labels, "labels")
    num_classes = _check_int(num_classes, "num_classes", minimum=1)
    device = generator.device if generator is not None else labels.device
    drawn = torch.randint(0, num_classes, labels.shape, generator=generator, device=device)
    return drawn.to(device=labels.device, dtype=labels.dtype)


def perturb_time_embedding(
    embedding: Tensor,
    timestep: Tensor | float,
    *,
    noise_scale: float = 3.0,
    power: float = 0.25,
    time_scale: float = 1000.0,
    scale_by_std: bool = True,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """TSG's noisy time-step embedding: ``e + s (t / T)^a n`` (times ``std(e)`` per sample when ``scale_by_std``).

    ``embedding`` is ``(B, D)`` (or ``(B, ..., D)``); ``timestep`` a number or one value per sample;
    ``T = time_scale`` normalises it (1000 for DDPM-style models; pass 1 for models whose time is
    already in ``[0, 1]``: whether the paper normalises ``t`` is not confirmed). Defaults are the
    reported SD setting ``s = 3.0, a = 0.25``. ``noise`` (shaped like ``embedding``) replaces the draw.

    Example:
        >>> import torch
        >>> from guidance.ops import perturb_time_embedding
        >>> e = torch.ones(2, 4)
        >>> perturb_time_embedding(e, 0.0, generator=torch.Generator().manual_seed(0)).equal(e)  # t = 0: unchanged
        True
    """
    _check_tensor(embedding, "embedding", floating=True, min_ndim=1)
    noise_scale = _check_range(noise_scale, "noise_scale", 0.0, math.inf, hi_open=True)
    power = _check_range(power, "power", 0.0, math.inf, hi_open=True)
    time_scale = _check_range(time_scale, "time_scale", 0.0, math.inf, lo_open=True, hi_open=True)
    scale_by_std = _check_bool(scale_by_std, "scale_by_std")
    if noise is not None:
        _check_tensor(noise, "noise", floating=True)
        _check_same_shape(noise, embedding, "noise", "embedding")
    dtype = _work_dtype(embedding)
    e = embedding.to(dtype)
    if noise is None:
        noise = _randn(embedding, generator, dtype)
    t = torch.as_tensor(timestep, dtype=dtype, device=embedding.device).reshape(-1)
    if t.numel() not in (1, e.shape[0]):
        raise ValueError(f"`timestep` must be a number or hold one value per sample ({e.shape[0]}), got {t.numel()}.")
    t = per_sample((t / time_scale).clamp_min(0), e)
    amplitude = noise_scale * t**power
    if scale_by_std:
        amplitude = amplitude * e.std(dim=_sample_dims(e, None), keepdim=True)
    return (e + amplitude * noise.to(dtype)).to(embedding.dtype)
