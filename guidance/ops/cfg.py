"""Classifier-free guidance on any prediction, on raw logits and on log-probabilities.

Conventions (``docs/methods.md``, "Conventions used everywhere"): ``g = u + w (c - u)``; ``w = 1`` is guidance off
and returns ``cond`` bit for bit, ``w = 0`` gives ``uncond``.

Scales: a Python number is checked here (finite, ``ValueError`` otherwise). A tensor scale of
shape ``()``, ``(1,)`` or ``(B,)`` (one scale per sample) is checked for its shape and dtype only:
reading its values would synchronise with the device on every step, so adapters and guiders check
them where they enter (:func:`guidance.validation.check_scale`). A NaN inside a tensor scale gives
NaN rows.
"""

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
    _is_one,
    _is_zero,
    _masked_combine,
    _pin_rows,
)
from guidance.tensors import saturate
from guidance.validation import check_finite, check_logits


def scale_from_ho_salimans(w_prime: float) -> float:
    """Our scale ``w = 1 + w'`` from Ho & Salimans' ``w'`` (they write ``(1 + w') c - w' u``).

    Args:
        w_prime (float): Ho & Salimans' guidance weight, a finite real number.

    Example:
        >>> from guidance.ops import scale_from_ho_salimans
        >>> scale_from_ho_salimans(2.0)
        3.0
    """
    return 1.0 + check_finite(w_prime, "w_prime")


def scale_to_ho_salimans(scale: float) -> float:
    """Inverse of :func:`scale_from_ho_salimans`: ``w' = w - 1``.

    Args:
        scale (float): our guidance scale, a finite real number.

    Example:
        >>> from guidance.ops import scale_to_ho_salimans
        >>> scale_to_ho_salimans(3.0)
        2.0
    """
    return check_finite(scale, "scale") - 1.0


def cfg(cond: Tensor, uncond: Tensor, scale: Scale) -> Tensor:
    """Classifier-free guidance ``u + w * (c - u)`` on any prediction type (eps, v, x0, flow, logits).

    Args:
        cond (Tensor): the conditional prediction, floating point, batch first, any shape.
        uncond (Tensor): the unconditional prediction, same shape as ``cond``.
        scale (float | Tensor): ``w``, a finite real number, or a tensor of shape ``()``, ``(1,)``
            or ``(B,)`` (one scale per sample; values not checked here, see the module docstring).

    Returns:
        Tensor: ``cond`` itself at ``scale == 1``, ``uncond`` itself at ``scale == 0``; otherwise
        the combination in ``cond``'s dtype, computed in the reference operation order (diffusers'
        pipelines, bit for bit in float32; float16/bfloat16 are computed in float32 and rounded once). With a tensor scale, samples whose scale is
        exactly 1 (0) are ``cond`` (``uncond``) bit for bit.

    Values: not inspected (no device sync). Half precision is computed in float32; where ``c - u``
    still overflows (huge values of opposite signs) the convex form ``(1 - w) u + w c`` is used, so
    finite inputs give a finite output wherever the exact result is representable; a result beyond
    the dtype's range saturates to ``+-finfo(dtype).max`` (finite inputs never give ``inf`` or NaN).
    NaN and infinite inputs propagate.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg
        >>> c, u = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
        >>> cfg(c, u, 3.0)
        tensor([[ 4., -2.]])
        >>> h = torch.tensor([6e4], dtype=torch.float16)
        >>> cfg(h, -h, 0.5)  # c - u overflows float16; the exact answer is 0
        tensor([0.], dtype=torch.float16)
    """
    _check_pair(cond, uncond)
    scale = _check_scale(scale, cond)
    if _is_one(scale):
        return cond
    if _is_zero(scale):
        return uncond
    c, u = _widen(cond), _widen(uncond)
    w = _as_batch_scale(scale, c)
    guided = _combine(c, u, w)
    if guided.dtype != cond.dtype:
        guided = saturate(guided.to(cond.dtype), cond, uncond)
    return _pin_rows(scale, guided, cond, uncond)


def _widen(x: Tensor) -> Tensor:
    """float16/bfloat16 computed in float32 (rounded once at the end): the half-precision
    intermediates ``c - u``, ``w (c - u)`` and ``(1 - w) u`` overflow where the result need not."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cfg_logits(cond_logits: Tensor, uncond_logits: Tensor, scale: Scale) -> Tensor:
    """Raw-logit CFG ``z_u + w * (z_c - z_u)``: transformers' batched ``ClassifierFreeGuidanceLogitsProcessor``.

    Differs from :func:`cfg_log_probs` by a per-row constant, so it samples the same tokens under
    temperature/top-k/top-p/typical/min-p, but its scores (and beam scores, repetition penalty) differ.

    Args:
        cond_logits (Tensor): ``(V,)`` or ``(B, ..., V)`` conditional scores, floating point; finite or
            ``-inf`` (masked). The last dimension is the vocabulary.
        uncond_logits (Tensor): unconditional scores, same shape.
        scale (float | Tensor): ``w``, a finite real number or a tensor of shape ``()``, ``(1,)`` or
            ``(B,)`` (one scale per row; a ``(V,)`` input is one row).

    Returns:
        Tensor: ``cond_logits`` itself at ``scale == 1`` and ``uncond_logits`` itself at
        ``scale == 0`` (values not inspected then); otherwise the guided scores in the inputs'
        dtype, equal to transformers' bit for bit. Per-sample scale rows of exactly 1 (0) are
        ``cond_logits`` (``uncond_logits``) bit for bit.

    Masking: a token that is ``-inf`` in either branch is ``-inf`` in the result (never NaN);
    a row masked everywhere stays all ``-inf``. NaN or ``+inf`` in either branch raises
    ``ValueError`` (checked only when some entry is not finite: one device sync per call).
    A result beyond the dtype's range saturates to ``+-finfo(dtype).max``, as for :func:`cfg`, so a
    softmax never meets ``+inf``.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_logits
        >>> cfg_logits(torch.tensor([[1.0, -float("inf")]]), torch.tensor([[0.0, 0.0]]), 2.0)
        tensor([[2., -inf]])
    """
    _check_pair(cond_logits, uncond_logits, ("cond_logits", "uncond_logits"))
    scale = _check_scale(scale, cond_logits, rows=True)
    if _is_one(scale):
        return cond_logits
    if _is_zero(scale):
        return uncond_logits
    c, u = _widen(cond_logits), _widen(uncond_logits)
    w = _as_batch_scale(scale, c)
    guided = _masked_combine(c, u, w, (cond_logits, uncond_logits), ("cond_logits", "uncond_logits"))
    if guided.dtype != cond_logits.dtype:
        guided = saturate(guided.to(cond_logits.dtype), cond_logits, uncond_logits)
    return _pin_rows(scale, guided, cond_logits, uncond_logits)


def _log_softmax(logits: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.log_softmax(logits.to(dtype), dim=-1)


def cfg_log_probs(cond_logits: Tensor, uncond_logits: Tensor, scale: Scale) -> Tensor:
    """Log-prob CFG of Sanchez et al.: ``log_softmax(z_u) + w * (log_softmax(z_c) - log_softmax(z_u))``.

    The form of transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor``, with the same
    float operations in the same order (bit-identical in float32).

    Args:
        cond_logits (Tensor): ``(V,)`` or ``(B, ..., V)`` conditional scores, floating point; finite or
            ``-inf`` (masked). The last dimension is the vocabulary.
        uncond_logits (Tensor): unconditional scores, same shape.
        scale (float | Tensor): ``w``, a finite real number or a tensor of shape ``()``, ``(1,)`` or
            ``(B,)`` (one scale per row; a ``(V,)`` input is one row).

    Returns:
        Tensor: at ``scale == 1``, ``cond_logits`` itself (not normalised, values not inspected),
        so that decoding is bit-identical to plain decoding. Otherwise float32 at least (the
        normalisation runs there): at ``scale == 0`` ``log_softmax(uncond_logits)``, else the
        guided log-probs. Per-sample scale rows of exactly 1 are ``cond_logits`` bit for bit
        (unnormalised, like the scalar case); rows of exactly 0 are ``log_softmax(uncond_logits)``.

    Masking: a token that is ``-inf`` in either used branch is ``-inf`` in the result; a row
    masked everywhere stays all ``-inf`` (never NaN). NaN or ``+inf`` in a used branch raises
    ``ValueError`` (checked only when some entry is not finite: one device sync per call).

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_log_probs
        >>> out = cfg_log_probs(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), 1.5)
        >>> torch.round(out, decimals=4)
        tensor([[ 0.1562, -2.8438]])
    """
    names = ("cond_logits", "uncond_logits")
    _check_pair(cond_logits, uncond_logits, names)
    scale = _check_scale(scale, cond_logits, rows=True)
    if _is_one(scale):
        return cond_logits
    dtype = torch.promote_types(cond_logits.dtype, torch.float32)
    uncond_lp = _log_softmax(uncond_logits, dtype)
    if _is_zero(scale):
        if bool(torch.isfinite(uncond_lp).all()):
            return uncond_lp
        check_logits(uncond_logits, "uncond_logits")
        return _no_nan_rows(uncond_lp)
    cond_lp = _log_softmax(cond_logits, dtype)
    w = _as_batch_scale(scale, cond_lp)
    guided = _masked_combine(cond_lp, uncond_lp, w, (cond_logits, uncond_logits), names)
    if not isinstance(scale, Tensor):
        return guided
    return _pin_rows(scale, guided, cond_logits, _no_nan_rows(uncond_lp))


def _no_nan_rows(log_probs: Tensor) -> Tensor:
    """``log_softmax`` of an all-``-inf`` row is NaN; such a row has no token left and stays all ``-inf``."""
    return torch.where(torch.isnan(log_probs), torch.full_like(log_probs, -math.inf), log_probs)
