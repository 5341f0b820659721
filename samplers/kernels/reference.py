"""PyTorch reference path of the typical-sampling kernels: runs on any device, no Triton.

Locally typical sampling (Meister et al., see ``docs/methods.md``) keeps the smallest set of
tokens, in ascending order of the score ``s = |-log p - H|`` (``H`` the entropy), whose
probability mass reaches ``mass``; the token that crosses the mass is kept, and so are its ties.
transformers' ``TypicalLogitsWarper`` finds that set by sorting the vocabulary and summing the
sorted probabilities in float32. Here no sort is done and the mass is summed in float64:

* ``log p``, ``p`` and ``H`` are computed by exactly the float32 operations transformers uses, so
  the scores ``s`` (and their order) are bit-identical to transformers';
* the threshold ``t`` (the score of the crossing token) is found by a radix select over the
  bit pattern of ``s`` (non-negative float32 bits are ordered like integers): a float64
  histogram of ``p`` over the top 11 bits picks the bucket where the cumulative mass crosses
  ``mass * total``, then 10 more bits among that bucket's tokens only, then the last 10
  (8 + 8 + 8 + 7 bits for vocabularies under 16k).
  Every decision compares float64 sums, so the boundary is exact where transformers' float32
  running sum is within rounding of the mass (see ``samplers.typical`` for how often);
* the kept set is ``{s <= t}``: ties with the crossing token are kept, as in transformers.

Sampling (:func:`cfg_typical_sample_torch`) draws one uniform ``u`` per row and returns the first
kept token whose float64 cumulative probability (in vocabulary order) exceeds ``u`` times the
kept mass: an inverse-CDF draw from the renormalised typical set that the Triton kernel
reproduces token for token, because both take ``u`` from :func:`row_uniforms`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops import cfg_log_probs

__all__ = [
    "cfg_log_softmax_torch",
    "cfg_typical_sample_torch",
    "check_logits",
    "row_uniforms",
    "splitmix64",
    "typical_filter_torch",
    "typical_keep_mask",
    "validate_mass",
    "validate_min_tokens_to_keep",
    "validate_temperature",
]

INF_KEY = 0x7F800000  # the bits of float32 +inf: the score of a -inf (masked) token
# (shift, buckets) of the radix levels: 11 + 10 + 10 bits for large vocabularies, 8 + 8 + 8 + 7
# bits for small ones (where a 2048-bucket histogram per row would outweigh the row itself)
_LEVELS_LARGE = ((20, 2048), (10, 1024), (0, 1024))
_LEVELS_SMALL = ((23, 256), (15, 256), (7, 256), (0, 128))


def validate_mass(mass: float) -> float:
    """``mass`` (transformers' ``typical_p``) must be a real number in (0, 1]; 1 turns the filter off."""
    if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not (0.0 < float(mass) <= 1.0):
        raise ValueError(f"`mass` (typical_p) must be a float in (0, 1], got {mass!r}.")
    return float(mass)


def validate_min_tokens_to_keep(min_tokens_to_keep: int) -> int:
    if (
        isinstance(min_tokens_to_keep, bool)
        or not isinstance(min_tokens_to_keep, int)
        or min_tokens_to_keep < 1
    ):
        raise ValueError(f"`min_tokens_to_keep` must be an integer >= 1, got {min_tokens_to_keep!r}.")
    return min_tokens_to_keep


def validate_temperature(temperature: float) -> float:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (0.0 < float(temperature) < math.inf)
    ):
        raise ValueError(
            f"`temperature` must be a finite float in (0, inf), got {temperature!r} (use argmax for greedy)."
        )
    return float(temperature)


def check_logits(scores: Tensor, name: str = "scores") -> None:
    """Raise ``ValueError`` on NaN or +inf logits (``-inf`` marks a masked token and is fine)."""
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got {type(scores).__name__}.")
    if scores.ndim != 2 or scores.shape[-1] == 0:
        raise ValueError(
            f"`{name}` must have shape (batch, vocab) with vocab >= 1, got {tuple(scores.shape)}."
        )
    bad = torch.isnan(scores) | (scores == math.inf)
    if bool(bad.any()):
        rows = bad.any(-1).nonzero().flatten().tolist()
        raise ValueError(
            f"`{name}` contains NaN or +inf logits in rows {rows[:10]}; logits must be finite or -inf."
        )


def _typical_scores(scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``log p``, ``p``, ``H`` and ``s = |-log p - H|`` by transformers' own float32 operations."""
    normalized = torch.log_softmax(scores, dim=-1)
    p = torch.exp(normalized)
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - ent)
    return normalized, p, ent, shifted


def _radix_threshold(keys: Tensor, weights: Tensor, mass: float) -> Tensor:
    """Smallest key ``t`` per row with ``sum(weights[keys <= t]) >= mass * sum(weights)`` (float64).

    ``keys`` (B, V) are int32 >= 0, ``weights`` (B, V) float64 >= 0. Sort-free: a few histogram
    levels over the key bits, each over the tokens of the bucket chosen by the level before.
    The target is clipped to each level's own total so that rounding can never select an
    empty bucket.
    """
    batch, vocab = keys.shape
    device = keys.device
    levels = _LEVELS_LARGE if vocab >= 16384 else _LEVELS_SMALL
    row_base = torch.arange(batch, device=device, dtype=torch.int32)
    target: Tensor | None = None
    below = torch.zeros(batch, dtype=torch.float64, device=device)
    threshold = torch.zeros(batch, dtype=torch.int32, device=device)
    cand_rows = cand_keys = cand_weights = torch.empty(0, device=device)
    for level, (shift, buckets) in enumerate(levels):
        if level == 0:
            digits = torch.bitwise_right_shift(keys, shift)
            index = (digits + (row_base * buckets)[:, None]).view(-1)
            values = weights.view(-1)
        else:
            digits = torch.bitwise_and(torch.bitwise_right_shift(cand_keys, shift), buckets - 1)
            index = digits + cand_rows * buckets
            values = cand_weights
        hist = torch.zeros(batch * buckets, dtype=torch.float64, device=device).index_add_(0, index, values)
        cum = torch.cumsum(hist.view(batch, buckets), -1).add_(below[:, None])
        if target is None:
            target = mass * cum[:, -1]
        level_target = torch.minimum(target, cum[:, -1])
        chosen = (cum < level_target[:, None]).sum(-1, dtype=torch.int32).clamp_(max=buckets - 1)
        below = torch.where(
            chosen > 0, cum.gather(1, (chosen.long() - 1).clamp_(min=0)[:, None])[:, 0], below
        )
        threshold = threshold + torch.bitwise_left_shift(chosen, shift)
        if level == 0:
            rows, cols = (digits == chosen[:, None]).nonzero(as_tuple=True)
            cand_rows, cand_keys, cand_weights = rows.to(torch.int32), keys[rows, cols], weights[rows, cols]
        elif level + 1 < len(levels):
            keep = digits == chosen[cand_rows]
            cand_rows, cand_keys, cand_weights = cand_rows[keep], cand_keys[keep], cand_weights[keep]
    return threshold


def typical_keep_mask(scores: Tensor, mass: float, min_tokens_to_keep: int = 1) -> tuple[Tensor, Tensor]:
    """The typical set of each row of ``scores`` (B, V), as a bool mask, and ``log p`` (float32).

    The scores are taken in float32 (half and bfloat16 are upcast, float64 is rounded), as
    transformers' ``generate`` hands its warpers float32 logits. Rows that are entirely
    ``-inf`` keep every token (there is nothing to choose). ``mass == 1`` keeps every token.
    """
    work = scores.float()
    normalized, p, ent, shifted = _typical_scores(work)
    if mass >= 1.0:
        return torch.ones_like(work, dtype=torch.bool), normalized
    valid = ~torch.isnan(ent)  # log_softmax of an all -inf row is NaN
    all_valid = bool(valid.all())
    if not all_valid:
        shifted = torch.where(valid, shifted, 0.0)
        p = torch.where(valid, p, 0.0)
    keys = shifted.view(torch.int32)  # bits of a float32 s >= 0 are ordered like s
    threshold = _radix_threshold(keys, p.double(), mass)
    if min_tokens_to_keep > 1:
        kth = torch.kthvalue(keys, min(min_tokens_to_keep, keys.shape[-1]), dim=-1).values
        threshold = torch.maximum(threshold, kth)
    keep = keys <= threshold[:, None]
    if not all_valid:
        keep |= ~valid
    return keep, normalized


def typical_filter_torch(
    scores: Tensor, mass: float, min_tokens_to_keep: int = 1, filter_value: float = -math.inf
) -> Tensor:
    """Set the scores of tokens outside the typical set to ``filter_value`` (PyTorch path)."""
    if mass >= 1.0:
        return scores
    keep, _ = typical_keep_mask(scores, mass, min_tokens_to_keep)
    return torch.where(keep, scores, torch.tensor(filter_value, dtype=scores.dtype, device=scores.device))


def cfg_log_softmax_torch(cond_logits: Tensor, uncond_logits: Tensor, scale: float | Tensor) -> Tensor:
    """The PyTorch path of ``cfg_log_softmax``: :func:`guidance.ops.cfg_log_probs` itself."""
    return cfg_log_probs(cond_logits, uncond_logits, scale)


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def splitmix64(seeds: Tensor) -> Tensor:
    """SplitMix64 of int64 ``seeds`` (two's-complement wrap-around, as in the C reference)."""
    z = seeds.to(torch.int64) + _signed64(_GOLDEN)
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _signed64(_MIX1)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _signed64(_MIX2)
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def row_uniforms(
    batch: int,
    device: torch.device,
    seed: int | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One float64 uniform in [0, 1) per row, the only randomness a draw uses.

    ``seed`` as an int gives row ``b`` the seed ``seed + b``; as a (B,) integer tensor, one seed
    per row. The uniform is the top 53 bits of SplitMix64(seed), on the same device, so a seed
    gives the same draw on every device and path. Otherwise the uniforms come from
    ``generator`` (or torch's global generator).
    """
    if seed is not None and generator is not None:
        raise ValueError("Pass either `seed` or `generator`, not both.")
    if seed is None:
        gen_device = generator.device if generator is not None else device
        return torch.rand(batch, dtype=torch.float64, generator=generator, device=gen_device).to(device)
    if isinstance(seed, Tensor):
        if (
            seed.shape != (batch,)
            or seed.is_floating_point()
            or seed.is_complex()
            or seed.dtype == torch.bool
        ):
            raise ValueError(
                f"`seed` as a tensor must be integers of shape ({batch},), got {seed.dtype} {tuple(seed.shape)}."
            )
        seeds = seed.to(device=device, dtype=torch.int64)
    elif isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < (1 << 63) - batch:
        seeds = seed + torch.arange(batch, device=device, dtype=torch.int64)
    else:
        raise ValueError(
            f"`seed` must be an int in [0, 2**63 - batch) or a (batch,) integer tensor, got {seed!r}."
        )
    bits = (splitmix64(seeds) >> 11) & ((1 << 53) - 1)
    return bits.to(torch.float64) * (2.0**-53)


def guided_log_probs(cond_logits: Tensor, uncond_logits: Tensor | None, scale: float | Tensor) -> Tensor:
    """``cfg_log_probs`` (or ``cond_logits`` when there is no guidance), in float32 at least."""
    if uncond_logits is None or (not isinstance(scale, Tensor) and scale == 1):
        guided = cond_logits
    else:
        guided = cfg_log_probs(cond_logits, uncond_logits, scale)
    return guided.to(torch.promote_types(guided.dtype, torch.float32))


def sample_kept(log_probs: Tensor, keep: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw over the kept tokens in vocabulary order, float64 cumulative mass."""
    weights = torch.where(keep, log_probs.exp(), 0.0).to(torch.float64)
    cum = weights.cumsum(-1)
    target = (uniforms * cum[:, -1])[:, None]
    tokens = torch.searchsorted(cum, target, right=True)[:, 0].clamp_(max=weights.shape[-1] - 1)
    drawn = weights.gather(1, tokens[:, None])[:, 0] > 0
    if not bool(drawn.all()):  # u * total rounded up to the total: take the last kept token
        last = weights.shape[-1] - 1 - (weights > 0).flip(-1).to(torch.int8).argmax(-1)
        tokens = torch.where(drawn, tokens, last)
    return tokens


def cfg_typical_sample_torch(
    cond_logits: Tensor,
    uncond_logits: Tensor | None,
    scale: float | Tensor,
    mass: float,
    *,
    temperature: float = 1.0,
    min_tokens_to_keep: int = 1,
    uniforms: Tensor,
) -> Tensor:
    """CFG (log-prob form) + temperature + typical filter + inverse-CDF draw, in plain PyTorch."""
    guided = guided_log_probs(cond_logits, uncond_logits, scale)
    if temperature != 1.0:
        guided = guided / temperature
    no_token = ~(guided > -math.inf).any(-1)
    if bool(no_token.any()):
        rows = no_token.nonzero().flatten().tolist()
        raise ValueError(
            f"Rows {rows[:10]} of the guided logits are entirely -inf: there is no token to sample."
        )
    keep, normalized = typical_keep_mask(guided, mass, min_tokens_to_keep)
    return sample_kept(normalized, keep, uniforms)
