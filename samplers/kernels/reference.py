"""PyTorch path of the typical-sampling kernels: runs on any device, no Triton.

Locally typical sampling (Meister et al., "Locally Typical Sampling", TACL 2023; see
``docs/methods.md``) keeps the smallest set of tokens, in ascending order of the score
``s = |-log p - H|`` (``H`` the entropy), whose probability mass reaches ``mass``.
transformers' ``TypicalLogitsWarper`` finds that set by sorting the vocabulary and summing the
sorted probabilities in float32. Here no sort is done and the mass is summed in float64:

* ``log p``, ``p`` and ``H`` are computed by exactly the float32 operations transformers uses, so
  the scores ``s`` (and their order) are bit-identical to transformers';
* the threshold ``t`` (the score of the crossing token) is found by a radix select over the
  bit pattern of ``s`` (non-negative float32 bits are ordered like integers): a float64
  histogram of ``p`` over the top 11 bits picks the bucket where the cumulative mass crosses
  ``mass * total``, then 10 more bits among that bucket's tokens only, then the last 10
  (8 + 8 + 8 + 7 bits for vocabularies under 16k).

Tie rule (the same on every path, PyTorch and Triton):

* **mass boundary**: every token whose score equals the crossing token's is kept (the set is
  ``{s <= t}``), as transformers does;
* **min_tokens_to_keep boundary**: when ``{s <= t}`` holds fewer than ``k =
  min_tokens_to_keep`` tokens, the first ``k`` tokens in (score, token id) order are kept:
  exactly ``k`` tokens, ties at the ``k``-th score broken by the lower token id. transformers
  keeps exactly ``k`` too, but breaks that tie by the order its (unstable) sort leaves.

Sampling (:func:`cfg_typical_sample_torch`) draws one uniform ``u`` per row and returns the first
kept token whose float64 cumulative probability (in vocabulary order) exceeds ``u`` times the
kept mass: an inverse-CDF draw from the renormalised typical set that the Triton kernels
reproduce token for token (up to float rounding at the boundaries), because all take ``u`` from
:func:`row_uniforms`.

The functions here do not validate their arguments: the public entry points in
:mod:`samplers.kernels` do, once, before calling them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops import cfg_log_probs
from guidance.tensors import surely_finite
from guidance.validation import (
    check_int,
    check_number,
    check_range,
    check_tensor,
)

__all__ = [
    "cfg_log_softmax_torch",
    "cfg_typical_sample_torch",
    "check_logits",
    "check_logit_values",
    "invalid_rows",
    "row_uniforms",
    "splitmix64",
    "typical_filter_torch",
    "typical_keep_mask",
    "validate_filter_value",
    "validate_mass",
    "validate_min_tokens_to_keep",
    "validate_temperature",
]

INF_KEY = 0x7F800000  # the bits of float32 +inf: the score of a -inf (masked) token
# (shift, buckets) of the radix levels: 11 + 10 + 10 bits for large vocabularies, 8 + 8 + 8 + 7
# bits for small ones (where a 2048-bucket histogram per row would outweigh the row itself)
_LEVELS_LARGE = ((20, 2048), (10, 1024), (0, 1024))
_LEVELS_SMALL = ((23, 256), (15, 256), (7, 256), (0, 128))


# --------------------------------------------------------------------------- argument checks


def validate_mass(mass: float) -> float:
    """``mass`` (transformers' ``typical_p``): a real number in (0, 1]; 1 turns the filter off.

    Example:
        >>> from samplers.kernels.reference import validate_mass
        >>> validate_mass(0.9)
        0.9
    """
    return check_range(mass, "mass", 0.0, 1.0, lo_open=True)


def validate_min_tokens_to_keep(min_tokens_to_keep: int) -> int:
    """``min_tokens_to_keep``: an integer >= 1.

    Example:
        >>> from samplers.kernels.reference import validate_min_tokens_to_keep
        >>> validate_min_tokens_to_keep(3)
        3
    """
    return check_int(min_tokens_to_keep, "min_tokens_to_keep", minimum=1)


MIN_TEMPERATURE = 1e-5  # below this, use greedy decoding (vLLM's cut-off too)


def validate_temperature(temperature: float) -> float:
    """``temperature``: a real number in [1e-5, inf).

    Lower temperatures are greedy decoding (an argmax) in all but name, and dividing log-probs
    by them overflows float32 (every token becomes ``-inf``); vLLM switches to greedy below the
    same value.

    Example:
        >>> from samplers.kernels.reference import validate_temperature
        >>> validate_temperature(0.7)
        0.7
    """
    number = check_number(temperature, "temperature")
    if not MIN_TEMPERATURE <= number < math.inf:
        raise ValueError(
            f"`temperature` must be a number in [{MIN_TEMPERATURE}, inf), got {temperature!r} "
            "(decode greedily, with an argmax, below that)."
        )
    return number


def validate_filter_value(filter_value: float) -> float:
    """``filter_value``: any real number but NaN (usually ``-inf``).

    Example:
        >>> from samplers.kernels.reference import validate_filter_value
        >>> validate_filter_value(float("-inf"))
        -inf
    """
    return check_range(filter_value, "filter_value", -math.inf, math.inf)


def check_logits(scores: Tensor, name: str = "scores", *, allow_1d: bool = False) -> Tensor:
    """Type and shape of a logits tensor: floating point, ``(batch, vocab)`` (or ``(vocab,)``), vocab >= 1.

    Looks at the metadata only (no device sync). Returns ``scores``.

    Args:
        scores (`torch.Tensor`): the tensor to check.
        name (`str`, *optional*, defaults to ``"scores"``): the argument name for the message.
        allow_1d (`bool`, *optional*, defaults to `False`): accept ``(vocab,)`` too.

    Example:
        >>> import torch
        >>> from samplers.kernels.reference import check_logits
        >>> check_logits(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """
    check_tensor(scores, name, floating=True)
    ndims = (1, 2) if allow_1d else (2,)
    if scores.ndim not in ndims or scores.shape[-1] == 0:
        shapes = "(batch, vocab) or (vocab,)" if allow_1d else "(batch, vocab)"
        raise ValueError(f"`{name}` must have shape {shapes} with vocab >= 1, got {tuple(scores.shape)}.")
    return scores


def invalid_rows(scores: Tensor) -> Tensor:
    """(B,) bool: rows of ``scores`` (B, V) holding a NaN or a ``+inf`` (no sync).

    Args:
        scores (`torch.Tensor`): ``(batch, vocab)`` float tensor.

    Example:
        >>> import torch
        >>> from samplers.kernels.reference import invalid_rows
        >>> invalid_rows(torch.tensor([[0.0, float("nan")], [0.0, float("-inf")]]))
        tensor([ True, False])
    """
    return (torch.isnan(scores) | (scores == math.inf)).any(-1)


def check_logit_values(scores: Tensor, name: str = "scores") -> None:
    """Raise ``ValueError`` on NaN or ``+inf`` logits (``-inf`` marks a masked token and is fine).

    Reads the values: on an accelerator this synchronises with the device.

    Args:
        scores (`torch.Tensor`): ``(batch, vocab)`` or ``(vocab,)`` float tensor.
        name (`str`, *optional*, defaults to ``"scores"``): the argument name for the message.

    Example:
        >>> import torch
        >>> from samplers.kernels.reference import check_logit_values
        >>> check_logit_values(torch.tensor([[0.0, float("nan")]]))
        Traceback (most recent call last):
        ...
        ValueError: `scores` contains NaN or +inf logits in rows [0]; logits must be finite or -inf.
    """
    bad = invalid_rows(scores if scores.ndim == 2 else scores[None])
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"`{name}` contains NaN or +inf logits in rows {rows[:10]}; logits must be finite or -inf."
        )


# --------------------------------------------------------------------------- typical set


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


def _first_k_by_score(keys: Tensor, k: int) -> Tensor:
    """The first ``k`` tokens of each row in (key, token id) order, as a bool mask (exactly ``k``)."""
    kth = torch.kthvalue(keys, k, dim=-1).values[:, None]
    below = keys < kth
    ties = keys == kth
    room = k - below.sum(-1, keepdim=True)
    return below | (ties & (ties.cumsum(-1) <= room))


def typical_keep_mask(scores: Tensor, mass: float, min_tokens_to_keep: int = 1) -> tuple[Tensor, Tensor]:
    """The typical set of each row of ``scores`` (B, V), as a bool mask, and ``log p`` (float32).

    The scores are taken in float32 (half and bfloat16 are upcast, float64 is rounded), as
    transformers' ``generate`` hands its warpers float32 logits. Rows without a finite score
    (entirely ``-inf``) and rows holding a NaN or ``+inf`` keep every token (their output is
    decided by the caller). ``mass == 1`` keeps every token. See the module docstring for the
    tie rule at both boundaries.

    Args:
        scores (`torch.Tensor`): ``(batch, vocab)`` logits, any float dtype, finite or ``-inf``.
        mass (`float`): ``typical_p`` in (0, 1].
        min_tokens_to_keep (`int`, *optional*, defaults to 1): >= 1.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the ``(batch, vocab)`` bool mask and the float32
        log-probs.

    Example:
        >>> import torch
        >>> from samplers.kernels.reference import typical_keep_mask
        >>> keep, _ = typical_keep_mask(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), 0.5)
        >>> keep
        tensor([[ True,  True, False, False]])
    """
    work = scores.float()
    normalized, p, ent, shifted = _typical_scores(work)
    if mass >= 1.0:
        return torch.ones_like(work, dtype=torch.bool), normalized
    # a row is searched iff it has a finite score and no NaN / +inf (nansum hides those in ent)
    valid = ((work > -math.inf).any(-1) & ~invalid_rows(work))[:, None]
    shifted = torch.where(valid, shifted, 0.0)
    p = torch.where(valid, p, 0.0)
    keys = shifted.view(torch.int32)  # bits of a float32 s >= 0 are ordered like s
    keep = keys <= _radix_threshold(keys, p.double(), mass)[:, None]
    if min_tokens_to_keep > 1:
        keep |= _first_k_by_score(keys, min(min_tokens_to_keep, keys.shape[-1]))
    return keep | ~valid, normalized


def typical_filter_torch(
    scores: Tensor,
    mass: float,
    min_tokens_to_keep: int = 1,
    filter_value: float = -math.inf,
    *,
    mark_invalid: bool = False,
) -> Tensor:
    """Scores of tokens outside the typical set become ``filter_value`` (PyTorch path of ``typical_filter``).

    ``scores`` (B, V) any float dtype. Rows that are entirely ``-inf`` come back unchanged;
    ``mark_invalid=True`` turns rows holding a NaN or ``+inf`` into NaN rows (the unchecked
    contract of :func:`samplers.kernels.typical_filter`).

    Args:
        scores (`torch.Tensor`): ``(batch, vocab)`` logits, any float dtype, finite or ``-inf``.
        mass (`float`): ``typical_p`` in (0, 1]; 1 returns ``scores`` itself.
        min_tokens_to_keep (`int`, *optional*, defaults to 1): >= 1.
        filter_value (`float`, *optional*, defaults to ``-inf``): value of removed tokens, not NaN.
        mark_invalid (`bool`, *optional*, defaults to `False`): NaN over rows with NaN / ``+inf``.

    Example:
        >>> import torch
        >>> from samplers.kernels.reference import typical_filter_torch
        >>> typical_filter_torch(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), 0.5)
        tensor([[-0.6931, -1.2040,    -inf,    -inf]])
    """
    if mass >= 1.0:
        return scores
    keep, _ = typical_keep_mask(scores, mass, min_tokens_to_keep)
    fill = torch.tensor(filter_value, dtype=scores.dtype, device=scores.device)
    out = torch.where(keep, scores, fill)
    if mark_invalid:
        out = torch.where(invalid_rows(scores)[:, None], math.nan, out)
    return out


# --------------------------------------------------------------------------- CFG + log-softmax


def _row_scale(scale: float | Tensor, like: Tensor) -> float | Tensor:
    """A tensor scale as a (B, 1) column on ``like``'s device, in ``like``'s dtype."""
    if not isinstance(scale, Tensor):
        return scale
    return scale.to(device=like.device, dtype=like.dtype).reshape(-1)[:, None].expand(like.shape[0], 1)


def cfg_log_softmax_torch(
    cond_logits: Tensor, uncond_logits: Tensor, scale: float | Tensor, *, finite: bool | None = None
) -> Tensor:
    """The PyTorch path of ``cfg_log_softmax``: :func:`guidance.ops.cfg_log_probs` with its edges defined.

    On top of ``cfg_log_probs`` (the one home of the formula): a row whose scale is exactly 1
    (scalar or per-row tensor) is ``cond_logits`` itself, bit for bit (upcast to float32 at
    least); a branch row that is entirely ``-inf`` gives an entirely ``-inf`` guided row where
    that branch has weight (never NaN). Arguments are not validated here.

    Args:
        cond_logits (`torch.Tensor`): ``(batch, vocab)`` conditional logits.
        uncond_logits (`torch.Tensor`): unconditional logits of the same shape.
        scale (`float` or `torch.Tensor`): finite scale, a number or one per row.
        finite (`bool`, *optional*): whether the caller found every entry of both inputs finite:
            ``True`` skips the edge handling, ``False`` runs it. By default the CPU path finds
            out with one pass over their sums, and other devices always handle the edges.

    Example:
        >>> import torch
        >>> from samplers.kernels.reference import cfg_log_softmax_torch
        >>> cond, uncond = torch.tensor([[2.0, 0.0], [1.0, 3.0]]), torch.zeros(2, 2)
        >>> cfg_log_softmax_torch(cond, uncond, torch.tensor([1.0, 2.0]))[0]  # row 0 at scale 1: cond
        tensor([2., 0.])
    """
    if not isinstance(scale, Tensor) and scale == 1:
        return cond_logits
    if finite is None:
        finite = cond_logits.device.type == "cpu" and surely_finite(cond_logits, uncond_logits)
    if finite:
        # no masked, NaN or +inf entry (the usual step): the edge handling below would change nothing
        return cfg_log_probs(cond_logits, uncond_logits, scale)
    # rows holding NaN/+inf are the caller's to report or mark (``check_finite``): combine the
    # others, and give those rows placeholder zeros so that the shared formula does not refuse them
    bad = (invalid_rows(cond_logits) | invalid_rows(uncond_logits))[:, None]
    cond_logits = torch.where(bad, torch.zeros_like(cond_logits), cond_logits)
    uncond_logits = torch.where(bad, torch.zeros_like(uncond_logits), uncond_logits)
    out = cfg_log_probs(cond_logits, uncond_logits, scale)
    w = _row_scale(scale, out)
    dead_cond = (cond_logits == -math.inf).all(-1, keepdim=True)
    dead_uncond = (uncond_logits == -math.inf).all(-1, keepdim=True)
    # log_softmax of an all -inf row is NaN: the guided row is all -inf wherever that branch counts
    dead = (dead_uncond & (w != 1)) | (dead_cond & (w != 0))
    out = torch.where(dead, -math.inf, out)
    if isinstance(w, Tensor):
        out = torch.where(w == 1, cond_logits.to(out.dtype), out)
    return out


# --------------------------------------------------------------------------- draws


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def splitmix64(seeds: Tensor) -> Tensor:
    """SplitMix64 of int64 ``seeds`` (two's-complement wrap-around, as in the C reference).

    Args:
        seeds (`torch.Tensor`): integer tensor, any shape; taken as int64.

    Example:
        >>> import torch
        >>> from samplers.kernels.reference import splitmix64
        >>> hex(int(splitmix64(torch.tensor([0]))[0]) & (2**64 - 1))
        '0xe220a8397b1dcdaf'
    """
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

    Args:
        batch (`int`): number of rows, >= 1.
        device (`torch.device`): where the uniforms live.
        seed (`int` or `torch.Tensor`, *optional*): an int in ``[0, 2**63 - batch)`` gives row
            ``b`` the seed ``seed + b``; a ``(batch,)`` integer tensor gives one seed per row.
            The uniform is the top 53 bits of SplitMix64(seed): a seed gives the same uniform
            on every device and path.
        generator (`torch.Generator`, *optional*): used when ``seed`` is None (torch's global
            generator when both are None); ``batch`` float64 draws are taken from it.

    Example:
        >>> import torch
        >>> from samplers.kernels.reference import row_uniforms
        >>> row_uniforms(2, torch.device("cpu"), seed=0)
        tensor([0.8833, 0.5666], dtype=torch.float64)
    """
    if seed is not None and generator is not None:
        raise ValueError("Pass either `seed` or `generator`, not both.")
    if seed is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
        gen_device = generator.device if generator is not None else device
        return torch.rand(batch, dtype=torch.float64, generator=generator, device=gen_device).to(device)
    if isinstance(seed, Tensor):
        if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise TypeError(f"`seed` as a tensor must hold integers, got dtype {seed.dtype}.")
        if seed.shape != (batch,):
            raise ValueError(f"`seed` as a tensor must have shape ({batch},), got {tuple(seed.shape)}.")
        seeds = seed.to(device=device, dtype=torch.int64)
    else:
        seed = check_int(seed, "seed", minimum=0, maximum=(1 << 63) - 1 - batch)
        seeds = seed + torch.arange(batch, device=device, dtype=torch.int64)
    bits = (splitmix64(seeds) >> 11) & ((1 << 53) - 1)
    return bits.to(torch.float64) * (2.0**-53)


def guided_log_probs(cond_logits: Tensor, uncond_logits: Tensor | None, scale: float | Tensor) -> Tensor:
    """``cfg_log_softmax_torch`` (or ``cond_logits`` without guidance), in float32 at least."""
    if uncond_logits is None or (not isinstance(scale, Tensor) and scale == 1):
        guided = cond_logits
    else:
        guided = cfg_log_softmax_torch(cond_logits, uncond_logits, scale)
    return guided.to(torch.promote_types(guided.dtype, torch.float32))


def sample_kept(log_probs: Tensor, keep: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw over the kept tokens in vocabulary order, float64 cumulative mass.

    Rows without a kept token of positive probability get ``-1``.
    """
    weights = torch.where(keep, log_probs.exp(), 0.0).to(torch.float64)
    cum = weights.cumsum(-1)
    target = (uniforms * cum[:, -1])[:, None]
    tokens = torch.searchsorted(cum, target, right=True)[:, 0].clamp_(max=weights.shape[-1] - 1)
    drawn = weights.gather(1, tokens[:, None])[:, 0] > 0
    # u * total rounded up to the total: take the last kept token (-1 when there is none)
    positive = weights > 0
    last = weights.shape[-1] - 1 - positive.flip(-1).to(torch.int8).argmax(-1)
    last = torch.where(positive.any(-1), last, -1)
    return torch.where(drawn, tokens, last)


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
    """CFG (log-prob form) + temperature + typical filter + inverse-CDF draw, in plain PyTorch.

    Returns int64 tokens; ``-1`` for a row whose guided logits hold a NaN or ``+inf`` or are
    entirely ``-inf`` (the caller raises or passes that on). Arguments are not validated here.

    Args:
        cond_logits (`torch.Tensor`): ``(batch, vocab)`` conditional logits.
        uncond_logits (`torch.Tensor` or None): unconditional logits of the same shape, or None.
        scale (`float` or `torch.Tensor`): finite scale, a number or one per row.
        mass (`float`): ``typical_p`` in (0, 1].
        temperature (`float`, *optional*, defaults to 1.0): in [1e-5, inf).
        min_tokens_to_keep (`int`, *optional*, defaults to 1): >= 1.
        uniforms (`torch.Tensor`): ``(batch,)`` float64 uniforms in [0, 1), see :func:`row_uniforms`.

    Example:
        >>> import torch
        >>> from samplers.kernels.reference import cfg_typical_sample_torch
        >>> cond = torch.tensor([[0.0, 5.0, 0.0]])
        >>> cfg_typical_sample_torch(cond, None, 1.0, 0.5, uniforms=torch.tensor([0.5], dtype=torch.float64))
        tensor([1])
    """
    guided = guided_log_probs(cond_logits, uncond_logits, scale)
    if temperature != 1.0:
        guided = guided / temperature
    keep, normalized = typical_keep_mask(guided, mass, min_tokens_to_keep)
    tokens = sample_kept(torch.nan_to_num(normalized, nan=-math.inf), keep, uniforms)
    bad = invalid_rows(guided)
    if uncond_logits is not None and (isinstance(scale, Tensor) or scale != 1):
        bad = bad | invalid_rows(cond_logits) | invalid_rows(uncond_logits)
    return torch.where(bad, -1, tokens)
