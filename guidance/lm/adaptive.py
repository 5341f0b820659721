"""Adaptive CFG decoding: compute the unconditional logits only for the rows and tokens where they can matter.

Passed to :func:`guidance.cfg_generate` as ``guidance_adaptive=`` (a threshold or an
:class:`AdaptiveLMGuidance`). Each step runs the conditional rows first; then, per row,
three rules decide whether the unconditional logits are needed for the token:

1. **Exact skips** (greedy decoding cannot change): the row has finished (it only receives
   padding), the step's guidance scale is 1, or the *head certificate* holds (below).
2. **Heuristic skip**: the conditional top-1 token leads its runner-up by a margin so large
   that the unconditional model would have to prefer the top-1 token by at least
   ``threshold`` nats for guidance to change the greedy choice.
3. Otherwise the unconditional logits are computed and combined as usual.

Why a margin decides. For any ``w`` and either CFG form (log-probs or logits), the guided
score gap between the conditional top-1 token ``a`` and another token ``j`` is
``g_a - g_j = w (c_a - c_j) - (w - 1) (u_a - u_j)``: the per-row normalisers cancel, so
only *differences* of unconditional logits matter. Guidance changes the greedy token only
if ``|u_a - u_j| >= w (c_a - c_j) / |w - 1|`` for some ``j`` (``w > 0``). Without
computing ``u`` there is no bound on ``u_a - u_j`` from past steps (the unconditional
context changes every token, and no Lipschitz constant links two steps), so a rule built on
the margin ``c_a - c_2`` alone is a heuristic: :func:`required_uncond_preference` returns the
smallest unconditional preference that could flip the token, and the row skips when it is at
least ``threshold``.

The head certificate is exact and needs no Lipschitz constant: in a Llama-style head the
logits are ``z = W h`` with ``h = gamma * x / rms(x)`` the final RMSNorm output, so
``||x / rms(x)|| <= sqrt(d)`` and ``|u_a - u_j| <= sqrt(d) ||(W_a - W_j) * gamma||`` for
*every* context. :func:`greedy_certificate` checks ``w (c_a - c_j) > |w - 1| D_aj`` for all
``j``; when it holds, full CFG provably picks ``a``. The bound is loose (80 to 350 nats on
SmolLM2-135M), so it fires only for scales close to 1; it is what makes the "differs from
full CFG only where the rule says guidance cannot matter" claim testable.

Scheduling. Skipping rows leave the forward: the conditional rows run alone, then only the
rows that need it run the unconditional branch, each with its own KV cache
(:class:`UnconditionalRows`). A row's cache catches up on the tokens it skipped in one
chunked forward when it is next needed, or never, if guidance ends first. The conditional
branch is never delayed by a catch-up: it runs before the rule looks at its logits.

What it saves. Every skipped token saves an unconditional *forward* (a catch-up of ``k``
tokens costs about one decode step on a CPU), but unconditional *positions* are saved only
where no guided token follows: the tail after a row's last guided token, finished rows, and
rows that never need guidance (short answers, the end of a sentence). A guided step costs a
second, sequential forward (the rule needs the conditional logits first), so with many guided
tokens batched CFG can be faster; ``stats.decisions`` shows the pattern.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from guidance import cfg_generate
    >>> from guidance.lm import AdaptiveLMGuidance
    >>> _ = torch.manual_seed(0)
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()
    >>> prompt = torch.tensor([[3, 5, 7]])
    >>> out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), guidance_scale=1.5, max_new_tokens=4,
    ...                   custom_generate=cfg_generate, guidance_adaptive=AdaptiveLMGuidance(threshold=4.0),
    ...                   return_dict_in_generate=True)
    >>> stats = out.adaptive_stats  # per row: positions computed, and what batched CFG would compute
    >>> stats.unconditional_positions.shape, stats.full_cfg_positions.tolist(), stats.decisions.shape
    (torch.Size([1]), [4], torch.Size([1, 4]))
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import LongTensor, Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation import GenerateDecoderOnlyOutput

from guidance.lm import compat
from guidance.lm.batching import GuidedBatch
from guidance.lm.two_branch import TwoBranchForward

__all__ = [
    "AdaptiveLMGuidance",
    "AdaptiveStats",
    "AdaptiveGenerateOutput",
    "AdaptiveForward",
    "EXACT_SKIP",
    "FINISHED",
    "GUIDED",
    "HEURISTIC_SKIP",
    "UNGUIDED",
    "HeadBound",
    "UnconditionalRows",
    "as_adaptive",
    "greedy_certificate",
    "head_bound",
    "required_uncond_preference",
]

# Config attributes that rescale logits after the head; the certificate refuses such models.
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class AdaptiveLMGuidance:
    """Settings of adaptive CFG decoding (``cfg_generate(..., guidance_adaptive=AdaptiveLMGuidance(...))``).

    Args:
        threshold (`float`, in ``[0, inf]``, default 4.0): heuristic rule. A row skips the
            unconditional branch for a token when the unconditional model would have to prefer the
            conditional top-1 token over its runner-up by at least ``threshold`` nats for guidance
            to change the greedy choice (``w (c_1 - c_2) / |w - 1| >= threshold``). At ``w = 1.5``,
            4.0 means a conditional top-1/top-2 log-prob margin of 4/3 nats. Larger is closer to
            full CFG and computes more; ``inf`` turns the heuristic off (exact rules only), 0
            skips every token. See ``benchmarks/lm_adaptive.py`` for the trade-off.
        certify (`bool` or `None`, default `None`): exact head certificate
            (:func:`greedy_certificate`). ``None`` uses it when the model's head supports it,
            ``True`` requires it (``ValueError`` otherwise), ``False`` turns it off.

    Example:
        >>> from guidance.lm.adaptive import AdaptiveLMGuidance, as_adaptive
        >>> as_adaptive(4.0)
        AdaptiveLMGuidance(threshold=4.0, certify=None)
        >>> AdaptiveLMGuidance(threshold=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: `threshold` must be a number in [0, inf], got -1.0.
    """

    threshold: float = 4.0
    certify: bool | None = None

    def __post_init__(self) -> None:
        value = self.threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`threshold` must be a float in [0, inf], got {type(value).__name__}.")
        if math.isnan(value) or value < 0:
            raise ValueError(f"`threshold` must be a number in [0, inf], got {value!r}.")
        if self.certify not in (None, True, False):
            raise TypeError(f"`certify` must be True, False or None, got {self.certify!r}.")


def as_adaptive(value: AdaptiveLMGuidance | float | None) -> AdaptiveLMGuidance | None:
    """``guidance_adaptive`` as a config: ``None`` (off), a threshold (`float`) or an :class:`AdaptiveLMGuidance`."""
    if value is None or isinstance(value, AdaptiveLMGuidance):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            "`guidance_adaptive` must be None, a threshold (float in [0, inf]) or an AdaptiveLMGuidance, "
            f"got {type(value).__name__}."
        )
    return AdaptiveLMGuidance(threshold=float(value))


def required_uncond_preference(cond_logits: Tensor, scale: float) -> Tensor:
    """Smallest unconditional preference (nats) for the conditional top-1 token that could change the greedy token.

    ``w (c_1 - c_2) / |w - 1|`` per row, from the conditional top-1/top-2 margin (logits or
    log-probs: the same margin). ``inf`` at ``w = 1`` (guidance off) or when only one token is
    unmasked; 0 for ``w <= 0`` (guidance can always change the token) and for rows whose
    logits are all ``-inf``.

    Args:
        cond_logits (`Tensor` of shape ``(rows, vocab)``): conditional next-token logits.
        scale (`float`, finite): the guidance scale ``w`` of ``u + w (c - u)``.

    Example:
        >>> import torch
        >>> required_uncond_preference(torch.tensor([[3.0, 1.0, 0.0]]), 1.5)
        tensor([6.])
    """
    rows, vocab = cond_logits.shape
    if scale == 1.0 or vocab < 2:
        return torch.full((rows,), math.inf, device=cond_logits.device)
    if scale <= 0:
        return torch.zeros(rows, device=cond_logits.device)
    top = cond_logits.float().topk(2, dim=-1).values
    margin = torch.nan_to_num(top[:, 0] - top[:, 1], nan=0.0)  # all -inf: nan -> guidance needed
    return margin * (scale / abs(scale - 1.0))


class HeadBound:
    """Exact bound on unconditional logit differences: ``|z_a - z_j| <= radius * ||(W_a - W_j) * gamma||``.

    Holds for every input when the head is ``z = W h`` and ``h = gamma * x / rms(x)`` (a final
    RMSNorm whose output norm is at most ``sqrt(d)``). Build it with :func:`head_bound`.

    Args:
        weight (`Tensor` of shape ``(vocab, d)``): the head's weight (used in place, never copied).
        gamma (`Tensor` of shape ``(d,)``): the final RMSNorm's weight.
        radius (`float`, > 0): bound on ``||x / rms(x)||`` (``sqrt(d)``).
    """

    def __init__(self, weight: Tensor, gamma: Tensor, radius: float):
        self.weight = weight
        self.gamma_sq = gamma.detach().float().pow(2)
        self.radius = float(radius)
        rows = []
        for chunk in weight.detach().split(4096):
            rows.append((chunk.float().pow(2) * self.gamma_sq).sum(-1))
        self.norm_sq = torch.cat(rows)  # ||W_j * gamma||^2
        self.spread_max = self.radius * self.norm_sq.sqrt()  # per-token bound B_j; D_aj <= B_a + B_j

    def spread(self, token: int, others: Tensor) -> Tensor:
        """``radius * ||(W_token - W_j) * gamma||`` for every ``j`` in ``others`` (a 1-D index tensor)."""
        anchor = self.weight[token].detach().float() * self.gamma_sq
        cross = self.weight.detach()[others].float() @ anchor
        squared = (self.norm_sq[token] + self.norm_sq[others] - 2 * cross).clamp_min(0)
        return self.radius * squared.sqrt()


# Per head module (weakly held): (weights' identity and version, bound).
_HEAD_BOUNDS: weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], HeadBound]] = weakref.WeakKeyDictionary()


def head_bound(model: Any) -> HeadBound | None:
    """The :class:`HeadBound` of a Llama-style causal LM, or ``None`` when its head is of another kind.

    Supported: a bias-free linear head (``get_output_embeddings()``) fed by the decoder's final
    ``norm``, an RMSNorm computing ``weight * x / sqrt(mean(x^2) + eps)`` (checked on a probe
    input), and no logit rescaling in the config (soft-capping is fine: it only shrinks gaps).
    The bound is cached per head weight (recomputed when the weights change).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or norm is None:
        return None
    if any(getattr(model.config, name, None) not in (None, 1, 1.0) for name in _LOGIT_SCALES):
        return None
    gamma = getattr(norm, "weight", None)
    if not isinstance(gamma, Tensor) or gamma.shape != (head.in_features,) or not _is_rms_norm(norm, gamma):
        return None
    key = (head.weight.data_ptr(), head.weight._version, gamma.data_ptr(), gamma._version)
    cached = _HEAD_BOUNDS.get(head)
    if cached is not None and cached[0] == key:
        return cached[1]
    bound = HeadBound(head.weight, gamma, math.sqrt(head.in_features))
    _HEAD_BOUNDS[head] = (key, bound)
    return bound


def _is_rms_norm(norm: Any, gamma: Tensor) -> bool:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(eps, float):
        return False
    probe = torch.randn(2, gamma.shape[0], generator=torch.Generator().manual_seed(0)).mul(3.0)
    probe = probe.to(device=gamma.device, dtype=gamma.dtype)
    with torch.no_grad():
        got = norm(probe).float()
    x = probe.float()
    expected = gamma.float() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return got.shape == expected.shape and bool(torch.allclose(got, expected, rtol=1e-2, atol=1e-3))


def greedy_certificate(cond_logits: Tensor, scale: float, bound: HeadBound) -> Tensor:
    """``(rows,)`` bool: True where full CFG provably picks the conditional top-1 token (greedy).

    For every ``j != a`` (``a`` the conditional argmax) it checks
    ``w (c_a - c_j) > |w - 1| D_aj + tol``, with ``D_aj`` the exact bound of ``bound`` on
    ``|u_a - u_j|`` and ``tol`` a rounding allowance for the logits' dtype. Cheap tests run
    first (``|B_a - B_j| <= D_aj <= B_a + B_j``), the exact ``D_aj`` only for undecided tokens.
    At ``w = 1`` every row is certified, at ``w <= 0`` none is.

    Args:
        cond_logits (`Tensor` of shape ``(rows, vocab)``): conditional logits (any float dtype).
        scale (`float`, finite): the guidance scale ``w``.
        bound (`HeadBound`): from :func:`head_bound` for the model that made ``cond_logits``.
    """
    rows = cond_logits.shape[0]
    if scale == 1.0:
        return torch.ones(rows, dtype=torch.bool, device=cond_logits.device)
    if scale <= 0:
        return torch.zeros(rows, dtype=torch.bool, device=cond_logits.device)
    need = abs(scale - 1.0) / scale
    logits = cond_logits.float()
    top = logits.argmax(-1)
    gap = logits.gather(1, top[:, None]) - logits  # >= 0; +inf for masked tokens
    spread = bound.spread_max.to(logits.device)
    eps = torch.finfo(cond_logits.dtype).eps
    tol = 8 * eps * (1 + need) * (logits.abs().nan_to_num(posinf=0).amax(-1, keepdim=True) + spread.max())
    lower = need * (spread[top][:, None] - spread).abs()
    hopeless = ((gap <= lower) & (gap < math.inf)).scatter(1, top[:, None], False).any(-1)
    hopeless |= ~torch.isfinite(logits.gather(1, top[:, None])[:, 0])
    certified = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    for row in (~hopeless).nonzero().flatten().tolist():
        a = int(top[row])
        open_ = gap[row] <= need * (spread[a] + spread) + tol[row]  # not settled by the upper bound
        open_[a] = False
        others = open_.nonzero().flatten()
        if others.numel() == 0:
            certified[row] = True
            continue
        exact = need * bound.spread(a, others.to(bound.weight.device)).to(logits.device) + tol[row]
        certified[row] = bool((gap[row, others] > exact).all())
    return certified


def _layer_states(cache: DynamicCache) -> list[tuple[Tensor, Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_from(states: list[tuple[Tensor, Tensor]], config: Any) -> DynamicCache:
    cache = DynamicCache(config=config)
    for index, (keys, values) in enumerate(states):
        cache.update(keys, values, index)
    return cache


def _check_full_attention(model: Any) -> None:
    layers = DynamicCache(config=model.config).layers
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise ValueError(
            "`guidance_adaptive` needs a model whose cache layers are all full attention (DynamicLayer); "
            f"{type(model).__name__} uses sliding-window or recurrent layers."
        )


class UnconditionalRows:
    """The unconditional branch of adaptive CFG: one KV cache per row, run only for the rows asked.

    Each row has its context (the unconditional prompt) and the generated tokens queued by
    :meth:`append`; :meth:`run` feeds every queued token of the asked rows in one batched,
    chunked forward (left-padded within the chunk; each row's past is left-padded to the
    longest) and returns their next-token logits. ``positions`` counts, per row, the token
    positions the branch has run (padding excluded).

    Args:
        model: a transformers causal LM whose cache layers are all full attention.
        contexts (`list` of 1-D `LongTensor`): each row's unconditional context (no padding).
        cache_argument (`str`): the keyword under which ``model.forward`` takes the cache.
    """

    def __init__(self, model: Any, contexts: list[LongTensor], cache_argument: str):
        self.model = model
        self._cache_argument = cache_argument
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._queued: list[list[Tensor]] = [[context] for context in contexts]
        self._caches: list[DynamicCache | None] = [None] * len(contexts)
        self.positions = torch.zeros(len(contexts), dtype=torch.long)

    def append(self, tokens: LongTensor, rows: Tensor) -> None:
        """Queue ``tokens[r]`` for every row ``r`` where ``rows[r]`` is True."""
        for row in rows.nonzero().flatten().tolist():
            self._queued[row].append(tokens[row : row + 1])

    def clear(self) -> None:
        """Guidance has ended: drop every cache and queued token."""
        self._caches = [None] * len(self._caches)
        self._queued = [[] for _ in self._queued]

    def run(self, rows: list[int]) -> Tensor:
        """Next-token logits ``(len(rows), vocab)`` of ``rows`` after their queued tokens."""
        chunks = [torch.cat(self._queued[row]) for row in rows]
        if any(chunk.numel() == 0 for chunk in chunks):
            raise RuntimeError("an unconditional row was asked for logits with no new token")
        if len(rows) == 1:
            cache = self._caches[rows[0]]
            cache = DynamicCache(config=self.model.config) if cache is None else cache
            past = cache.get_seq_length()
            outputs = self._forward(chunks[0][None], torch.ones(1, past + chunks[0].numel(), dtype=torch.long,
                                    device=chunks[0].device), self._positions([past], chunks), cache)
            self._caches[rows[0]] = cache
        else:
            outputs, cache = self._run_batched(rows, chunks)
        for row, chunk in zip(rows, chunks, strict=True):
            self._queued[row] = []
            self.positions[row] += chunk.numel()
        return outputs.logits[:, -1].float()

    def _run_batched(self, rows: list[int], chunks: list[Tensor]) -> tuple[Any, DynamicCache]:
        pasts = [0 if self._caches[row] is None else self._caches[row].get_seq_length() for row in rows]
        past, width = max(pasts), max(chunk.numel() for chunk in chunks)
        device = chunks[0].device
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), past + width, dtype=torch.long, device=device)
        for i, (chunk, length) in enumerate(zip(chunks, pasts, strict=True)):
            ids[i, width - chunk.numel() :] = chunk
            mask[i, past - length : past] = 1
            mask[i, past + width - chunk.numel() :] = 1
        cache = DynamicCache(config=self.model.config) if past == 0 else self._gather(rows, pasts, past)
        outputs = self._forward(ids, mask, self._positions(pasts, chunks, width), cache)
        merged = _layer_states(cache)
        for i, (row, chunk, length) in enumerate(zip(rows, chunks, pasts, strict=True)):
            keep = torch.cat([torch.arange(past - length, past), torch.arange(past + width - chunk.numel(), past + width)])
            keep = keep.to(device)
            states = [(k[i : i + 1, :, keep], v[i : i + 1, :, keep]) for k, v in merged]
            self._caches[row] = _cache_from(states, self.model.config)
        return outputs, cache

    def _gather(self, rows: list[int], pasts: list[int], past: int) -> DynamicCache:
        """One cache for ``rows``: each row's past left-padded (zeros, masked) to ``past`` slots."""
        caches = [self._caches[row] for row in rows]
        layers = [[] if cache is None else _layer_states(cache) for cache in caches]
        template = next(states for states in layers if states)
        merged = []
        for index, (keys, values) in enumerate(template):
            shape = (len(rows), keys.shape[1], past, keys.shape[3])
            k_all, v_all = keys.new_zeros(shape), values.new_zeros(shape[:3] + (values.shape[3],))
            for i, (states, length) in enumerate(zip(layers, pasts, strict=True)):
                if length:
                    k_all[i, :, past - length :] = states[index][0][0]
                    v_all[i, :, past - length :] = states[index][1][0]
            merged.append((k_all, v_all))
        return _cache_from(merged, self.model.config)

    @staticmethod
    def _positions(pasts: list[int], chunks: list[Tensor], width: int | None = None) -> LongTensor:
        width = width or chunks[0].numel()
        offsets = torch.arange(width, device=chunks[0].device)
        rows = [(past + offsets - (width - chunk.numel())).clamp_min(0) for past, chunk in zip(pasts, chunks, strict=True)]
        return torch.stack(rows)

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: DynamicCache) -> Any:
        kwargs: dict[str, Any] = {self._cache_argument: cache}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        return self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, return_dict=True, **kwargs
        )


#: Codes of :attr:`AdaptiveStats.decisions`.
GUIDED, EXACT_SKIP, HEURISTIC_SKIP, FINISHED, UNGUIDED = 0, 1, 2, 3, -1


@dataclass
class AdaptiveStats:
    """What adaptive CFG computed, per row.

    Attributes:
        unconditional_positions (`LongTensor` of shape ``(rows,)``): token positions the
            unconditional branch ran (padding excluded).
        full_cfg_positions (`LongTensor` of shape ``(rows,)``): positions batched CFG
            (``guidance_adaptive=None``) runs for the same decoding: the unconditional context
            plus every token fed back while guidance is on, finished rows included.
        live_cfg_positions (`LongTensor` of shape ``(rows,)``): the same, counting only the
            tokens fed back while the row was unfinished (what CFG needs at all).
        decisions (`LongTensor` of shape ``(rows, steps)``): per generated token, ``GUIDED`` (0,
            unconditional logits computed), ``EXACT_SKIP`` (1: scale 1 or head certificate; the
            greedy token cannot change), ``HEURISTIC_SKIP`` (2: the ``threshold`` rule),
            ``FINISHED`` (3: the row only receives padding) or ``UNGUIDED`` (-1: guidance had ended).
    """

    unconditional_positions: LongTensor
    full_cfg_positions: LongTensor
    live_cfg_positions: LongTensor
    decisions: LongTensor

    def _count(self, code: int) -> LongTensor:
        return (self.decisions == code).sum(1)

    @property
    def guided_steps(self) -> LongTensor:
        """``(rows,)`` tokens chosen with the unconditional logits."""
        return self._count(GUIDED)

    @property
    def exact_skips(self) -> LongTensor:
        """``(rows,)`` tokens skipped by an exact rule (finished rows not counted)."""
        return self._count(EXACT_SKIP)

    @property
    def heuristic_skips(self) -> LongTensor:
        """``(rows,)`` tokens skipped by the ``threshold`` rule."""
        return self._count(HEURISTIC_SKIP)

    @property
    def fraction(self) -> float:
        """Unconditional positions computed, as a fraction of what CFG needs for the live rows (all rows together)."""
        total = int(self.live_cfg_positions.sum())
        return int(self.unconditional_positions.sum()) / total if total else 0.0


@dataclass
class AdaptiveGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` with the per-row :class:`AdaptiveStats` of adaptive CFG (``adaptive_stats``)."""

    adaptive_stats: AdaptiveStats | None = field(default=None)


class AdaptiveForward:
    """Drop-in for :class:`~guidance.lm.two_branch.TwoBranchForward` in the greedy/sampling loop, with adaptive CFG.

    The conditional rows run as one batch (a ``TwoBranchForward`` with guidance off); after
    each conditional forward, :meth:`next_scores` applies the rules of this module and runs
    the unconditional branch (:class:`UnconditionalRows`) for the rows that need it.

    Args:
        model: a transformers causal LM (full-attention cache layers).
        batch (`GuidedBatch`): the ``2R`` batch of :func:`guidance.lm.batching.build_guided_batch`.
        forward_kwargs (`dict`): extra keyword arguments for the conditional forward.
        config (`AdaptiveLMGuidance`): the rules' settings.
        cfg_form (`str`): ``"log_probs"`` or ``"logits"``; skipping rows get ``log_softmax(c)``
            or ``c``, the guided scores of that form with the unconditional term removed.
    """

    def __init__(
        self, model: Any, batch: GuidedBatch, forward_kwargs: dict[str, Any], config: AdaptiveLMGuidance, cfg_form: str
    ):
        _check_full_attention(model)
        rows = batch.rows
        self.rows = rows
        self.config = config
        self.guided = True
        self.bound = None if config.certify is False else head_bound(model)
        if config.certify and self.bound is None:
            raise ValueError(
                "`AdaptiveLMGuidance(certify=True)` needs a Llama-style head (final RMSNorm, bias-free linear head, "
                f"no logit scaling); {type(model).__name__} has another. Use certify=None or False."
            )
        self._normalise = cfg_form == "log_probs"
        cond_mask = batch.attention_mask[:rows]
        start = int((cond_mask.sum(0) > 0).nonzero()[0])  # drop columns that pad only the unconditional rows
        cond = GuidedBatch(batch.input_ids[:rows, start:], cond_mask[:, start:], batch.position_ids[:rows, start:], rows)
        self.conditional = TwoBranchForward(model, cond, forward_kwargs)
        self.conditional.guided = False
        contexts = [ids[mask.bool()] for ids, mask in zip(batch.input_ids[rows:], batch.attention_mask[rows:], strict=True)]
        self.unconditional = UnconditionalRows(model, contexts, compat.cache_argument(model))
        self.unfinished = torch.ones(rows, dtype=torch.bool)
        self._full_positions = torch.tensor([len(context) for context in contexts])
        self._live_positions = self._full_positions.clone()
        self._decisions: list[Tensor] = []

    def __call__(self) -> Any:
        """The conditional rows' forward on their pending tokens."""
        return self.conditional()

    def split(self, value: Tensor) -> tuple[Tensor, None]:
        """Outputs hold conditional rows only."""
        return value, None

    def next_scores(self, outputs: Any, scale: float, combine: Any, step: int) -> tuple[Tensor, Tensor]:
        """``(guided scores, conditional logits)``: guided rows combined, skipping rows from ``c`` alone."""
        _, cond = self.conditional.next_scores(outputs, 1.0, combine, step)
        if not self.guided:
            self._decisions.append(torch.full((self.rows,), UNGUIDED))
            return cond, cond
        scores = torch.log_softmax(cond, dim=-1) if self._normalise and scale != 1.0 else cond.clone()
        need = self._decide(cond, scale)
        if bool(need.any()):
            index = need.nonzero().flatten()
            uncond = self.unconditional.run(index.tolist()).to(cond.device)
            if bool(torch.isnan(uncond).any()):
                raise ValueError(f"The model produced NaN logits at generated token {step}; guidance cannot be applied.")
            scores[index] = combine(cond[index], uncond, scale)
        return scores, cond

    def _decide(self, cond: Tensor, scale: float) -> Tensor:
        """Rows that need the unconditional logits now; counts each row's outcome in ``stats``."""
        finished = ~self.unfinished.to(cond.device)
        exact = torch.zeros_like(finished)
        if scale == 1.0:
            exact = ~finished
        elif self.bound is not None and not bool(finished.all()):
            alive = (~finished).nonzero().flatten()
            exact[alive] = greedy_certificate(cond[alive], scale, self.bound)
        heuristic = ~finished & ~exact & (required_uncond_preference(cond, scale) >= self.config.threshold)
        codes = torch.full((self.rows,), GUIDED, device=cond.device)
        codes[exact], codes[heuristic], codes[finished] = EXACT_SKIP, HEURISTIC_SKIP, FINISHED
        self._decisions.append(codes.cpu())
        return codes == GUIDED

    def mark_unfinished(self, unfinished: Tensor) -> None:
        """Rows whose ``unfinished`` is 0 only receive padding from now on: they never need ``u`` again."""
        self.unfinished = unfinished.bool().cpu()

    def append(self, tokens: LongTensor) -> None:
        """Feed the chosen tokens to the conditional rows and queue them for the unconditional ones."""
        self.conditional.append(tokens)
        if self.guided:
            self.unconditional.append(tokens, self.unfinished)
            self._full_positions += 1
            self._live_positions += self.unfinished.long()

    def drop_unconditional(self) -> None:
        """Guidance is off for the rest of the sequence: the unconditional caches are never needed again."""
        if self.guided:
            self.guided = False
            self.unconditional.clear()

    @property
    def stats(self) -> AdaptiveStats:
        """The :class:`AdaptiveStats` so far."""
        decisions = torch.stack(self._decisions, 1) if self._decisions else torch.zeros(self.rows, 0, dtype=torch.long)
        return AdaptiveStats(
            self.unconditional.positions.clone(), self._full_positions.clone(), self._live_positions.clone(), decisions
        )

    def output(self, result: Any) -> Any:
        """Attach the stats to a ``GenerateDecoderOnlyOutput`` (plain tensors are returned unchanged)."""
        if not isinstance(result, GenerateDecoderOnlyOutput):
            return result
        return AdaptiveGenerateOutput(**dict(result.items()), adaptive_stats=self.stats)
