"""Pure guidance operators: predictions in, prediction out.

Conventions (see ``shared/METHODS.md``):

* ``cond`` (c) is the conditional prediction, ``uncond`` (u) the unconditional or
  negative-prompt prediction, ``scale`` (w) the guidance scale.
* Scale convention: ``g = u + w * (c - u)``. ``w = 1`` is guidance off (returns ``c``
  bit for bit), ``w = 0`` gives ``u``. Ho & Salimans' ``w'`` is ``w - 1``; convert
  with :func:`scale_from_ho_salimans`.
* ``scale`` is a Python number or a tensor broadcastable against the batch
  dimension (shape ``(B,)`` gives one scale per sample).
* Operators work on any prediction type (eps, v, x0, logits) unless a docstring
  says otherwise; per-sample reductions run over all non-batch dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from guidance.ops._common import Scale, _as_batch_scale, _check_pair, _is_one, _is_zero, _masked_combine


def scale_from_ho_salimans(w_prime: float) -> float:
    """Ho & Salimans write ``(1 + w') c - w' u``; this returns our ``w = 1 + w'``."""
    return 1.0 + float(w_prime)


def scale_to_ho_salimans(scale: float) -> float:
    """Inverse of :func:`scale_from_ho_salimans`: ``w' = w - 1``."""
    return float(scale) - 1.0


def cfg(cond: Tensor, uncond: Tensor, scale: Scale) -> Tensor:
    """Classifier-free guidance ``u + w * (c - u)`` on any prediction type.

    Returns ``cond`` itself at ``scale == 1`` and ``uncond`` at ``scale == 0``. A tensor
    ``scale`` of shape ``(B,)`` guides each sample with its own scale; samples whose
    scale is exactly 1 are returned bit for bit.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg
        >>> c, u = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
        >>> cfg(c, u, 3.0)
        tensor([[ 4., -2.]])
    """
    _check_pair(cond, uncond)
    if _is_one(scale):
        return cond
    if _is_zero(scale):
        return uncond
    w = _as_batch_scale(scale, cond)
    guided = uncond + w * (cond - uncond)
    if isinstance(w, Tensor):
        guided = torch.where(w == 1, cond, guided)
    return guided


def cfg_logits(cond_logits: Tensor, uncond_logits: Tensor, scale: Scale) -> Tensor:
    """Raw-logit CFG: ``z_u + w * (z_c - z_u)`` (transformers' batched ``ClassifierFreeGuidanceLogitsProcessor``).

    Differs from :func:`cfg_log_probs` by a per-row constant, so it samples the same
    tokens under temperature/top-k/top-p/typical/min-p, but its scores (and beam
    scores, repetition penalty) differ. ``-inf`` entries (masked tokens) never
    produce NaN: a token masked in either guided branch stays masked.
    Returns ``cond_logits`` itself at ``scale == 1``.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_logits
        >>> cfg_logits(torch.tensor([[1.0, -float("inf")]]), torch.tensor([[0.0, 0.0]]), 2.0)
        tensor([[2., -inf]])
    """
    _check_pair(cond_logits, uncond_logits)
    if _is_one(scale):
        return cond_logits
    if _is_zero(scale):
        return uncond_logits
    return _masked_combine(cond_logits, uncond_logits, scale)


def cfg_log_probs(cond_logits: Tensor, uncond_logits: Tensor, scale: Scale) -> Tensor:
    """Log-prob CFG of Sanchez et al.: ``log_softmax(z_u) + w * (log_softmax(z_c) - log_softmax(z_u))``.

    This is the form of transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor``
    and gives the same numbers (same float operations in the same order). The
    normalisation runs in float32 at least; the result has the dtype of the inputs
    promoted to float32. At ``scale == 1`` guidance is off and ``cond_logits`` is
    returned unchanged (not normalised), so that decoding is bit-identical to plain
    decoding. ``-inf`` entries stay ``-inf``; rows never become NaN unless a whole
    branch row is ``-inf``.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_log_probs
        >>> out = cfg_log_probs(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), 1.5)
        >>> torch.round(out, decimals=4)
        tensor([[ 0.1562, -2.8438]])
    """
    _check_pair(cond_logits, uncond_logits)
    if _is_one(scale):
        return cond_logits
    dtype = torch.promote_types(cond_logits.dtype, torch.float32)
    cond_lp = torch.log_softmax(cond_logits.to(dtype), dim=-1)
    uncond_lp = torch.log_softmax(uncond_logits.to(dtype), dim=-1)
    if _is_zero(scale):
        return uncond_lp
    return _masked_combine(cond_lp, uncond_lp, scale)
