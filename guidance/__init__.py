"""Classifier-free guidance and its successors for language and diffusion models.

The core (operators, schedules, guiders, spaces, adaptive guidance) is pure PyTorch. The
transformers adapter (``cfg_generate``, ``generate_text``, ``CFGLogitsProcessor``) is imported
eagerly; the diffusers adapter (``attach``, ``detach``, callbacks) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from guidance import adaptive, guiders, ops, schedules, spaces
from guidance.adaptive import AdaptiveGuidance, RatioCutoff, cosine_similarity
from guidance.guiders import APG, CFG, BetaCFG, CFGZeroStar, Guider, PerpNeg, RescaledCFG, guide
from guidance.lm import (
    CFGLogitsProcessor,
    ClassifierWeightedLogitsProcessor,
    GeDiLogitsProcessor,
    ModelUnconditionalLogits,
    cfg_generate,
    generate_text,
)
from guidance.ops import (
    MomentumBuffer,
    apg,
    beta_cfg,
    cfg,
    cfg_log_probs,
    cfg_logits,
    cfg_rescaled,
    cfg_zero_star,
    perp_neg,
    rescale,
    scale_from_ho_salimans,
)
from guidance.spaces import NoiseLevel, from_x0, to_x0

_DIFFUSERS_NAMES = {
    "attach": "guidance.diffusion",
    "detach": "guidance.diffusion",
    "ScheduleCallback": "guidance.diffusion",
    "CFGCutoffCallback": "guidance.diffusion",
    "GuidanceHandle": "guidance.diffusion",
    "GuidanceStats": "guidance.diffusion",
    "diffusion": "guidance.diffusion",
}


def __getattr__(name: str) -> Any:
    if name in _DIFFUSERS_NAMES:
        module = importlib.import_module(_DIFFUSERS_NAMES[name])
        return module if name == "diffusion" else getattr(module, name)
    raise AttributeError(f"module 'guidance' has no attribute {name!r}")


__all__ = [
    "APG",
    "AdaptiveGuidance",
    "BetaCFG",
    "CFG",
    "CFGCutoffCallback",
    "CFGLogitsProcessor",
    "ClassifierWeightedLogitsProcessor",
    "GeDiLogitsProcessor",
    "CFGZeroStar",
    "Guider",
    "GuidanceHandle",
    "GuidanceStats",
    "ModelUnconditionalLogits",
    "MomentumBuffer",
    "NoiseLevel",
    "PerpNeg",
    "RatioCutoff",
    "RescaledCFG",
    "ScheduleCallback",
    "adaptive",
    "apg",
    "attach",
    "beta_cfg",
    "cfg",
    "cfg_generate",
    "cfg_log_probs",
    "cfg_logits",
    "cfg_rescaled",
    "cfg_zero_star",
    "cosine_similarity",
    "detach",
    "diffusion",
    "from_x0",
    "generate_text",
    "guide",
    "guiders",
    "ops",
    "perp_neg",
    "rescale",
    "scale_from_ho_salimans",
    "schedules",
    "spaces",
    "to_x0",
]
__version__ = "0.1.0"
