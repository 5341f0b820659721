"""transformers adapter: batched CFG decoding for ``generate`` and LogitsProcessor forms.

Importing it checks that the installed transformers is in the tested range
(:data:`guidance.lm.compat.TESTED_TRANSFORMERS`): an untested version raises ``ImportError``
naming the range (``GUIDANCE_ALLOW_UNTESTED_TRANSFORMERS=1`` turns that into a warning).
"""

from guidance.lm import compat  # first: refuses an untested transformers before anything uses it
from guidance.lm.adaptive import AdaptiveLMGuidance
from guidance.lm.generate import CFG_FORMS, cfg_generate
from guidance.lm.processors import CFGLogitsProcessor, ModelUnconditionalLogits
from guidance.lm.steering import (
    ClassifierWeightedLogitsProcessor,
    GeDiLogitsProcessor,
    SentenceEncoderClassifier,
    TransformersTextClassifier,
)
from guidance.lm.text import GenerationResult, encode_prompts, generate_text

__all__ = [
    "AdaptiveLMGuidance",
    "CFG_FORMS",
    "compat",
    "CFGLogitsProcessor",
    "ClassifierWeightedLogitsProcessor",
    "GeDiLogitsProcessor",
    "SentenceEncoderClassifier",
    "TransformersTextClassifier",
    "GenerationResult",
    "ModelUnconditionalLogits",
    "cfg_generate",
    "encode_prompts",
    "generate_text",
]
