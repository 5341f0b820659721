"""Embedded models: the SmolLM2 language model (here), the digits diffusion model and its judge
(`guidance.models.digits`, `guidance.models.digits_judge`), the sentiment and profanity classifiers
(`guidance.models.sentiment`, `guidance.models.profanity`). The latter import diffusers or extra
packages, so they load only when imported by name.
"""

from guidance.models.smollm2 import (
    DEFAULT_MODEL_NAME,
    cache_dir,
    default_model_path,
    load_causal_lm,
    load_default_lm,
)

__all__ = ["DEFAULT_MODEL_NAME", "cache_dir", "default_model_path", "load_causal_lm", "load_default_lm"]

_LAZY = {
    "DigitsPipeline": "guidance.models.digits",
    "load_digits_pipeline": "guidance.models.digits",
    "DigitsJudge": "guidance.models.digits_judge",
    "load_digits_judge": "guidance.models.digits_judge",
    "load_sentiment_classifier": "guidance.models.sentiment",
    "ProfanityClassifier": "guidance.models.profanity",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'guidance.models' has no attribute {name!r}")
