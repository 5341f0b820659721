"""Guiders: small stateful classes over the pure operators of :mod:`guidance.ops`, one family per file.

See :mod:`guidance.guiders.base` for the protocol adapters drive (``reset``, ``needs_uncond``,
``__call__``, ``space``) and :func:`guide`, which converts to the guider's space and back.
"""

from guidance.guiders.apg import APG
from guidance.guiders.apg_mix import APGMix
from guidance.guiders.autoguidance import AutoGuidance
from guidance.guiders.base import GUIDER_SPACES, Guider, guide
from guidance.guiders.beta import BetaCFG
from guidance.guiders.cfg import CFG, RescaledCFG
from guidance.guiders.condition import IndependentCondition, TimestepGuidance
from guidance.guiders.fdg import FrequencyDecoupled
from guidance.guiders.fresca import FreSca
from guidance.guiders.magnitude import MagnitudeAware
from guidance.guiders.mahiro import SimilarityAdaptive
from guidance.guiders.nag import NormalizedAttention
from guidance.guiders.perp_neg import PerpNeg
from guidance.guiders.perturbed import (
    PerturbedAttention,
    PerturbedGuider,
    SkipLayer,
    SmoothedEnergy,
    StochasticSelf,
    TokenPerturbation,
)
from guidance.guiders.renorm import CFGNorm, RenormCFG
from guidance.guiders.tangential import TangentialCFG
from guidance.guiders.zero_star import CFGZeroStar

__all__ = [
    "Guider",
    "CFG",
    "RescaledCFG",
    "APG",
    "CFGZeroStar",
    "PerpNeg",
    "BetaCFG",
    "TangentialCFG",
    "FrequencyDecoupled",
    "MagnitudeAware",
    "APGMix",
    "CFGNorm",
    "RenormCFG",
    "SimilarityAdaptive",
    "FreSca",
    "IndependentCondition",
    "TimestepGuidance",
    "guide",
    "GUIDER_SPACES",
    "PerturbedGuider",
    "PerturbedAttention",
    "SmoothedEnergy",
    "SkipLayer",
    "TokenPerturbation",
    "StochasticSelf",
    "AutoGuidance",
    "NormalizedAttention",
]
