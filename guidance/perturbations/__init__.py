"""Perturbations of the denoiser for guidance from a degraded prediction, one hook per file.

Pure PyTorch on ``nn.Module`` trees (attention processors are duck-typed, diffusers is never
imported), so the guiders of the core can build their default hooks without the diffusers adapter.
:mod:`~guidance.perturbations.hooks` installs and removes processors and forward hooks;
:mod:`~guidance.perturbations.condition` holds the condition/time-step perturbations of ICG and TSG.

Each is a :class:`~guidance.diffusion.branches.BranchHook` (``per_row`` and
``apply(module, rows)``) that a guider puts on its ``perturbed`` branch; entering installs the
change, leaving removes it (also on an exception). All of them act per row, so the perturbed
branch shares one batched denoiser call with ``cond`` and ``uncond``:

* :class:`IdentityAttention` (PAG, STG-A): self-attention map replaced by the identity;
* :class:`SmoothedQueries` (SEG): self-attention queries blurred over the token grid;
* :class:`SkipBlocks` (SLG, STG-R): whole blocks return their input;
* :class:`ShuffleTokens` (TPG): the tokens entering blocks are permuted;
* :class:`StochasticSkip` (S^2-Guidance): a random subset of blocks skipped per step;
* :class:`NormalizedCrossAttention` (NAG): cross-attention guided away from a negative context
  (on the ``cond`` branch itself, no extra branch).

Layers are chosen with :func:`layer_matcher` specs (``"mid"``, ``"transformer_blocks.7"``,
``fnmatch`` patterns or a predicate).
"""

from guidance.perturbations._common import layer_matcher
from guidance.perturbations.identity_attention import IdentityAttention, identity_attention
from guidance.perturbations.normalized_attention import NormalizedCrossAttention
from guidance.perturbations.skip_blocks import SkipBlocks
from guidance.perturbations.smoothed_queries import SmoothedQueries, blur_queries
from guidance.perturbations.stochastic_skip import StochasticSkip
from guidance.perturbations.token_shuffle import ShuffleTokens

__all__ = [
    "layer_matcher",
    "IdentityAttention",
    "identity_attention",
    "SmoothedQueries",
    "blur_queries",
    "SkipBlocks",
    "ShuffleTokens",
    "StochasticSkip",
    "NormalizedCrossAttention",
]
