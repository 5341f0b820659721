"""Classifier-free guidance and its successors for language and diffusion models.

The core (:mod:`guidance.ops`, :mod:`guidance.schedules`, :mod:`guidance.guiders`,
:mod:`guidance.spaces`, :mod:`guidance.adaptive`, :mod:`guidance.validation`) is pure PyTorch and
imports neither transformers nor diffusers nor vllm. Every name below loads on first use
(PEP 562), so ``import guidance.ops`` stays light and the adapters (:mod:`guidance.lm` for
transformers, :mod:`guidance.diffusion` for diffusers, :mod:`guidance.vllm`) load only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # core
    "ops": "guidance.ops",
    "schedules": "guidance.schedules",
    "guiders": "guidance.guiders",
    "spaces": "guidance.spaces",
    "adaptive": "guidance.adaptive",
    "validation": "guidance.validation",
    "AdaptiveGuidance": "guidance.adaptive",
    "RatioCutoff": "guidance.adaptive",
    "cosine_similarity": "guidance.adaptive",
    "APG": "guidance.guiders",
    "CFG": "guidance.guiders",
    "BetaCFG": "guidance.guiders",
    "CFGZeroStar": "guidance.guiders",
    "Guider": "guidance.guiders",
    "PerpNeg": "guidance.guiders",
    "RescaledCFG": "guidance.guiders",
    "guide": "guidance.guiders",
    "MomentumBuffer": "guidance.ops",
    "apg": "guidance.ops",
    "beta_cfg": "guidance.ops",
    "cfg": "guidance.ops",
    "cfg_log_probs": "guidance.ops",
    "cfg_logits": "guidance.ops",
    "cfg_rescaled": "guidance.ops",
    "cfg_zero_star": "guidance.ops",
    "perp_neg": "guidance.ops",
    "rescale": "guidance.ops",
    "scale_from_ho_salimans": "guidance.ops",
    "NoiseLevel": "guidance.spaces",
    "from_x0": "guidance.spaces",
    "to_x0": "guidance.spaces",
    # transformers adapter
    "lm": "guidance.lm",
    "CFGLogitsProcessor": "guidance.lm",
    "ClassifierWeightedLogitsProcessor": "guidance.lm",
    "GeDiLogitsProcessor": "guidance.lm",
    "ModelUnconditionalLogits": "guidance.lm",
    "cfg_generate": "guidance.lm",
    "generate_text": "guidance.lm",
    # diffusers adapter
    "diffusion": "guidance.diffusion",
    "attach": "guidance.diffusion",
    "detach": "guidance.diffusion",
    "ScheduleCallback": "guidance.diffusion",
    "CFGCutoffCallback": "guidance.diffusion",
    "GuidanceHandle": "guidance.diffusion",
    "GuidanceStats": "guidance.diffusion",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'guidance' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__ == f"guidance.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
