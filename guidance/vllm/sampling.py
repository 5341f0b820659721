"""vLLM's sampling order as pure tensor functions, for the rows whose token CFG decides itself.

A CFG pair is two rows of vLLM's batch (the prompt and its unconditional companion) that
must emit the same token. vLLM samples every row on its own, so the CFG processor draws the
token of each pair from the guided scores and hands both rows a one-hot row. The user's
settings must act on the guided distribution exactly as vLLM would apply them to a plain
request; this module holds them in vLLM's order (``vllm/v1/sample/sampler.py``):

1. penalties: repetition (prompt and output tokens), frequency, presence (output tokens);
2. greedy rows (temperature below ``1e-5``) take the argmax here;
3. temperature, then min-p, then the locally typical filter (``typical_p``), then top-k
   and top-p;
4. a draw by inverse CDF from one uniform per row, the uniform a hash of the request's
   seed and the token position, so a seeded request draws the same tokens however the
   scheduler batches it (vLLM's own seeded draws depend on how many steps the row took).

No vllm import: ``tests/vllm/test_vllm_sampling.py`` checks each step against vLLM's own
functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from samplers.kernels import typical_filter

__all__ = [
    "GREEDY_EPS",
    "RowSettings",
    "apply_penalties",
    "decide_tokens",
    "draw",
    "min_p_filter",
    "position_uniform",
    "top_k_top_p_filter",
]

#: vLLM samples greedily below this temperature (``_SAMPLING_EPS``).
GREEDY_EPS = 1e-5
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class RowSettings:
    """The sampling settings of one request (vLLM ``SamplingParams`` fields, ``typical_p`` from ``extra_args``)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def position_uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1) from SplitMix64 of ``(seed, position)``: the same draw however rows are batched.

    Example:
        >>> from guidance.vllm.sampling import position_uniform
        >>> position_uniform(0, 3) == position_uniform(0, 3) != position_uniform(0, 4)
        True
    """
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def _counts(token_lists: Sequence[Sequence[int]], vocab: int, device: torch.device) -> Tensor:
    counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if tokens:
            counts[row].scatter_add_(0, torch.as_tensor(list(tokens), dtype=torch.long), torch.ones(len(tokens), dtype=torch.long))
    return counts[:, :vocab].to(device)


def apply_penalties(
    logits: Tensor,
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    settings: Sequence[RowSettings],
) -> Tensor:
    """vLLM's penalties, in its order: repetition, then frequency, then presence (a new tensor).

    Repetition divides positive scores (multiplies the others) of tokens seen in the prompt
    or output by ``repetition_penalty``; frequency subtracts ``frequency_penalty`` per output
    occurrence; presence subtracts ``presence_penalty`` once for a token in the output.

    Example:
        >>> import torch
        >>> from guidance.vllm.sampling import RowSettings, apply_penalties
        >>> apply_penalties(torch.tensor([[2.0, -1.0, 1.0]]), [[0]], [[1, 1]], [RowSettings(repetition_penalty=2.0,
        ...                 frequency_penalty=0.5)])
        tensor([[ 1., -3.,  1.]])
    """
    if not any(s.penalised for s in settings):
        return logits
    vocab = logits.shape[-1]
    output_counts = _counts(output_ids, vocab, logits.device).to(logits.dtype)
    seen = (_counts(prompt_ids, vocab, logits.device) > 0) | (output_counts > 0)
    column = lambda values: torch.tensor(values, dtype=logits.dtype, device=logits.device)[:, None]  # noqa: E731
    repetition = column([s.repetition_penalty for s in settings])
    factor = torch.where(seen, repetition, torch.ones_like(repetition))
    out = logits * torch.where(logits > 0, 1.0 / factor, factor)
    out = out - column([s.frequency_penalty for s in settings]) * output_counts
    return out - column([s.presence_penalty for s in settings]) * (output_counts > 0).to(logits.dtype)


def min_p_filter(logits: Tensor, min_p: Tensor) -> Tensor:
    """vLLM's min-p: tokens whose probability is below ``min_p`` times the row's largest become -inf."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, -math.inf)


def top_k_top_p_filter(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """vLLM's top-k then top-p (``top_k`` 0 or >= vocab is off; ``top_p`` 1 is off).

    Top-k keeps every token tied with the k-th largest score; top-p keeps the largest
    scores whose mass, summed from the smallest up, exceeds ``1 - top_p`` (at least one).
    """
    vocab = logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k >= vocab), torch.full_like(top_k, vocab), top_k)
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    kth = sorted_logits.gather(1, (vocab - k).long()[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p)[:, None]
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def draw(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw: the first token (vocabulary order) whose cumulative probability exceeds ``u``."""
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    cumulative = probs.cumsum(dim=-1)
    index = torch.searchsorted(cumulative, (uniforms.to(torch.float64) * cumulative[:, -1])[:, None], right=True)
    index = index.clamp(max=logits.shape[-1] - 1)[:, 0]
    # A -inf token has zero mass, so it can only be hit at a zero-width step; move to the next kept one.
    kept = torch.isfinite(logits)
    bad = ~kept.gather(1, index[:, None])[:, 0]
    if bool(bad.any()):
        for row in bad.nonzero().flatten().tolist():
            candidates = kept[row].nonzero().flatten()
            later = candidates[candidates >= index[row]]
            index[row] = later[0] if later.numel() else candidates[-1]
    return index


def decide_tokens(
    guided: Tensor,
    settings: Sequence[RowSettings],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> Tensor:
    """The token of each row, drawn from ``guided`` scores with the user's settings in vLLM's order.

    ``guided`` is ``(B, V)`` float32; ``settings``, ``prompt_ids`` and ``output_ids`` give one
    entry per row (``output_ids`` are the tokens generated so far; its length is the position
    of the token drawn, which picks the row's uniform). Returns a ``(B,)`` LongTensor.

    Example:
        >>> import torch
        >>> from guidance.vllm.sampling import RowSettings, decide_tokens
        >>> scores = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
        >>> decide_tokens(scores, [RowSettings(temperature=0.0), RowSettings(top_k=1)], [[0], [0]], [[], []])
        tensor([1, 0])
    """
    logits = apply_penalties(guided, prompt_ids, output_ids, settings)
    if all(s.greedy for s in settings):
        return logits.argmax(dim=-1)
    tokens = torch.empty(len(settings), dtype=torch.long, device=logits.device)
    greedy = torch.tensor([s.greedy for s in settings], device=logits.device)
    if bool(greedy.any()):
        tokens[greedy] = logits[greedy].argmax(dim=-1)
    rows = (~greedy).nonzero().flatten()
    sampled = [settings[i] for i in rows.tolist()]
    values = lambda name, dtype: torch.tensor([getattr(s, name) for s in sampled], dtype=dtype)  # noqa: E731
    z = logits[rows] / values("temperature", logits.dtype)[:, None].to(logits.device)
    if any(s.min_p > 0 for s in sampled):
        z = min_p_filter(z, values("min_p", z.dtype).to(z.device))
    for row, s in enumerate(sampled):
        if s.typical_p < 1:
            z[row] = typical_filter(z[row : row + 1], s.typical_p)[0]
    if any(s.top_p < 1 or 0 < s.top_k < z.shape[-1] for s in sampled):
        z = top_k_top_p_filter(z, values("top_k", torch.long).to(z.device), values("top_p", z.dtype).to(z.device))
    positions = [len(output_ids[i]) for i in rows.tolist()]
    uniforms = torch.tensor([position_uniform(s.seed, p) for s, p in zip(sampled, positions, strict=True)])
    tokens[rows] = draw(z, uniforms.to(z.device))
    return tokens
