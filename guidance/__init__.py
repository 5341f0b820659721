"""Classifier-free guidance and its successors for language and diffusion models."""

from guidance import ops, schedules
from guidance.lm import CFGLogitsProcessor, cfg_generate, generate_text
from guidance.ops import cfg, cfg_log_probs, cfg_logits

__all__ = ["ops", "schedules", "cfg", "cfg_log_probs", "cfg_logits", "cfg_generate", "generate_text", "CFGLogitsProcessor"]
__version__ = "0.1.0"
