"""transformers adapter: batched CFG decoding for ``generate`` and LogitsProcessor forms."""

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
    "CFG_FORMS",
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
