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
