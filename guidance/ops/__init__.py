"""Pure guidance operators: predictions in, prediction out. One formula per function, one family per file.

Conventions (the full reference is ``docs/methods.md``):

* ``cond`` (c) is the conditional prediction, ``uncond`` (u) the unconditional or
  negative-prompt prediction, ``scale`` (w) the guidance scale.
* Scale convention: ``g = u + w * (c - u)``. ``w = 1`` is guidance off (returns ``cond``
  bit for bit), ``w = 0`` gives ``uncond``. Ho & Salimans' ``w'`` is ``w - 1``; convert
  with :func:`scale_from_ho_salimans`.
* ``scale`` is a finite Python number (checked) or a tensor of shape ``()``, ``(1,)`` or ``(B,)``
  (one scale per sample; shape checked, values not: that would sync the device, so guiders and
  adapters check them where they enter). Rows whose scale is exactly 1 are ``cond`` bit for bit.
* Contracts: NaN/``+inf`` logits raise ``ValueError``; ``-inf`` (masked) never becomes NaN; finite
  inputs give finite outputs wherever the exact result is representable (float32/float16/bfloat16;
  norms are power-of-two scaled, half precision is computed in float32 where it could overflow) and
  ``+-finfo(dtype).max`` where it is not (saturation: finite inputs never give inf or NaN).
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
from guidance.ops.condition import perturb_time_embedding, random_embedding_like, random_labels_like
from guidance.ops.fdg import collapse_pyramid, fdg, laplacian_pyramid
from guidance.ops.fresca import FRESCA_CONVENTIONS, frequency_scale, fresca
from guidance.ops.magnitude import magnitude_ratio, mambo_g
from guidance.ops.mahiro import MAHIRO_CONVENTIONS, mahiro
from guidance.ops.nag import NAG_NORMS, normalized_attention_guidance
from guidance.ops.perp_neg import perp_neg
from guidance.ops.perturbed import PERTURBED_CONVENTIONS, autoguidance, perturbed_guidance
from guidance.ops.projection import project
from guidance.ops.renorm import RENORM_CONVENTIONS, cfg_norm, cfg_renorm, renorm
from guidance.ops.rescale import cfg_rescaled, rescale
from guidance.ops.tangential import tangential_damping, tcfg
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
    "PERTURBED_CONVENTIONS",
    "perturbed_guidance",
    "autoguidance",
    "project",
    "tangential_damping",
    "tcfg",
    "magnitude_ratio",
    "mambo_g",
    "laplacian_pyramid",
    "collapse_pyramid",
    "fdg",
    "FRESCA_CONVENTIONS",
    "frequency_scale",
    "fresca",
    "RENORM_CONVENTIONS",
    "renorm",
    "cfg_renorm",
    "cfg_norm",
    "MAHIRO_CONVENTIONS",
    "mahiro",
    "random_embedding_like",
    "random_labels_like",
    "perturb_time_embedding",
    "NAG_NORMS",
    "normalized_attention_guidance",
]
