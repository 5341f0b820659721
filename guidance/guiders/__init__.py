"""Guiders: small stateful classes over the pure operators of :mod:`guidance.ops`, one family per file.

See :mod:`guidance.guiders.base` for the protocol adapters drive (``reset``, ``needs_uncond``,
``__call__``, ``space``) and :func:`guide`, which converts to the guider's space and back.
"""

from guidance.guiders.apg import APG
from guidance.guiders.base import GUIDER_SPACES, Guider, guide
from guidance.guiders.beta import BetaCFG
from guidance.guiders.cfg import CFG, RescaledCFG
from guidance.guiders.perp_neg import PerpNeg
from guidance.guiders.zero_star import CFGZeroStar

__all__ = [
    "Guider",
    "CFG",
    "RescaledCFG",
    "APG",
    "CFGZeroStar",
    "PerpNeg",
    "BetaCFG",
    "guide",
    "GUIDER_SPACES",
]
