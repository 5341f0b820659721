"""transformers adapter: batched CFG decoding for ``generate`` and LogitsProcessor forms."""

from guidance.lm.generate import CFG_FORMS, cfg_generate

__all__ = ["CFG_FORMS", "cfg_generate"]
