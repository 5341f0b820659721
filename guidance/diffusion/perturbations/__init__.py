"""Perturbations of the denoiser for guidance from a degraded prediction, one hook per file.

Each is a :class:`~guidance.diffusion.branches.BranchHook` (``per_row`` and
``apply(module, rows)``) that a guider puts on its ``perturbed`` branch; entering installs the
change, leaving removes it (also on an exception). All of them act per row, so the perturbed
branch shares one batched denoiser call with ``cond`` and ``uncond``:

* :class:`IdentityAttention` (PAG, STG-A): self-attention map replaced by the identity;
* :class:`SmoothedQueries` (SEG): self-attention queries blurred over the token grid;
* :class:`SkipBlocks` (SLG, STG-R): whole blocks return their input;
* :class:`ShuffleTokens` (TPG): the tokens entering blocks are permuted;
* :class:`StochasticSkip` (S^2-Guidance): a random subset of blocks skipped per step.

Layers are chosen with :func:`layer_matcher` specs (``"mid"``, ``"transformer_blocks.7"``,
``fnmatch`` patterns or a predicate).
"""

from guidance.diffusion.perturbations._common import layer_matcher
from guidance.diffusion.perturbations.identity_attention import IdentityAttention, identity_attention
from guidance.diffusion.perturbations.skip_blocks import SkipBlocks
from guidance.diffusion.perturbations.smoothed_queries import SmoothedQueries, blur_queries
from guidance.diffusion.perturbations.stochastic_skip import StochasticSkip
from guidance.diffusion.perturbations.token_shuffle import ShuffleTokens

__all__ = [
    "layer_matcher",
    "IdentityAttention",
    "identity_attention",
    "SmoothedQueries",
    "blur_queries",
    "SkipBlocks",
    "ShuffleTokens",
    "StochasticSkip",
]
