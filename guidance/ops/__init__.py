"""Pure guidance operators: predictions in, prediction out. One formula per function, one family per file.

Conventions (the full reference is ``docs/methods.md``):

* ``cond`` (c) is the conditional prediction, ``uncond`` (u) the unconditional or
  negative-prompt prediction, ``scale`` (w) the guidance scale.
* Scale convention: ``g = u + w * (c - u)``. ``w = 1`` is guidance off (returns ``cond``
  bit for bit), ``w = 0`` gives ``uncond``. Ho & Salimans' ``w'`` is ``w - 1``; convert
  with :func:`scale_from_ho_salimans`.
* ``scale`` is a Python number or a tensor broadcastable against the batch
  dimension (shape ``(B,)`` gives one scale per sample).
* Operators work on any prediction type (eps, v, x0, logits) unless a docstring
  says otherwise; per-sample reductions run over all non-batch dimensions.

Modules: :mod:`~guidance.ops.cfg` (CFG for any prediction, raw logits and log-probs),
:mod:`~guidance.ops.rescale`, :mod:`~guidance.ops.apg`, :mod:`~guidance.ops.zero_star`,
:mod:`~guidance.ops.perp_neg`, :mod:`~guidance.ops.beta`.
"""

from guidance.ops._common import Scale, validate_scale
from guidance.ops.apg import APG_CONVENTIONS, MomentumBuffer, apg
from guidance.ops.beta import beta_cfg
from guidance.ops.cfg import cfg, cfg_log_probs, cfg_logits, scale_from_ho_salimans, scale_to_ho_salimans
from guidance.ops.perp_neg import perp_neg
from guidance.ops.rescale import cfg_rescaled, rescale
from guidance.ops.zero_star import cfg_zero_star, zero_star_alpha

__all__ = [
    "Scale",
    "cfg",
    "cfg_logits",
    "cfg_log_probs",
    "scale_from_ho_salimans",
    "scale_to_ho_salimans",
    "validate_scale",
    "rescale",
    "cfg_rescaled",
    "APG_CONVENTIONS",
    "MomentumBuffer",
    "apg",
    "zero_star_alpha",
    "cfg_zero_star",
    "perp_neg",
    "beta_cfg",
]
