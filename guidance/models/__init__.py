"""Embedded default models: the SmolLM2 language model (and, later, the digits diffusion model)."""

from guidance.models.smollm2 import DEFAULT_MODEL_NAME, cache_dir, default_model_path, load_causal_lm, load_default_lm

__all__ = ["DEFAULT_MODEL_NAME", "cache_dir", "default_model_path", "load_causal_lm", "load_default_lm"]
