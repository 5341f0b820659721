"""Classifier-free guidance and its successors for language and diffusion models."""

from guidance import ops, schedules
from guidance.ops import cfg, cfg_log_probs, cfg_logits

__all__ = ["ops", "schedules", "cfg", "cfg_log_probs", "cfg_logits"]
__version__ = "0.1.0"
