"""Mahiro (ComfyUI's experimental ``Mahiro`` node): lean towards ``w c`` where the guided direction disagrees with it."""

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
from guidance.ops.cfg import cfg
from guidance.tensors import per_sample
from guidance.validation import check_choice as _check_choice

MAHIRO_CONVENTIONS = ("per_sample", "comfyui")


def _signed_sqrt(x: Tensor) -> Tensor:
    return torch.sqrt(x.abs()) * x.sign()


def mahiro(cond: Tensor, uncond: Tensor, scale: Scale, *, convention: str = "per_sample") -> Tensor:
    """Similarity-adaptive CFG (ComfyUI ``Mahiro``): a mix of ``g = cfg(c, u, w)`` and the "leap" ``w c``.

    ``L = w c``, ``m = (L + g) / 2``; ``sim`` is the cosine similarity over dim 1 (channels) of the
    signed square roots ``sqrt|w u| sign(u)`` and ``sqrt|m| sign(m)``, averaged over positions;
    with ``k = 2 (sim + 1)`` in ``[0, 4]`` the result is ``(k g + (4 - k) L) / 4``: plain ``g`` when
    they agree, ``w c`` when they point opposite ways.

    ``convention="per_sample"`` (default) averages ``sim`` per sample, so each sample's result
    depends on itself only; ``"comfyui"`` averages over the whole batch (one ``sim`` for all), as
    the node does. They agree for a batch of one. No paper; ComfyUI applies it to denoised
    predictions (the ``SimilarityAdaptive`` guider's default space). Returns ``cond`` itself at ``scale == 1``.

    Example:
        >>> import torch
        >>> from guidance.ops import mahiro
        >>> c, u = torch.tensor([[[2.0], [1.0]]]), torch.tensor([[[1.0], [1.0]]])
        >>> mahiro(c, u, 1.0) is c
        True
    """
    _check_choice(convention, "convention", MAHIRO_CONVENTIONS)
    _check_pair(cond, uncond, min_ndim=2)  # a channel dim: (B, C, ...)
    if _is_one(scale):
        return cond
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)
    w = _as_batch_scale(scale, c)
    guided = cfg(c, u, scale)
    leap = w * c
    merge = (leap + guided) / 2
    similarity = torch.nn.functional.cosine_similarity(_signed_sqrt(w * u), _signed_sqrt(merge), dim=1)
    if convention == "comfyui":
        similarity = similarity.mean().expand(c.shape[0])
    else:
        similarity = similarity.reshape(c.shape[0], -1).mean(dim=1)
    k = per_sample(2 * (similarity + 1), c)
    out = (k * guided + (4 - k) * leap) / 4
    return _keep_cond_where_one(scale, cond, out.to(cond.dtype))
