"""Classifier-free guidance in vLLM: the per-request settings and the logits processor of a pair.

A CFG request runs as two rows of vLLM's batch: the request itself (the conditional row)
and an unconditional companion request that :class:`guidance.vllm.CFGScheduler` creates
inside the engine, whose prompt is the negative prompt (default: the last prompt token, as
in Sanchez et al. and transformers). In every step where both rows sample,
:class:`CFGLogitsProcessor` combines them with :func:`guidance.ops.cfg_log_probs`, draws the
token from the guided scores with the request's own settings (:mod:`guidance.vllm.sampling`,
vLLM's order) and hands BOTH rows a one-hot row, so vLLM's sampler emits that token for the
request and for its companion: the unconditional branch sees exactly the guided tokens. The
scheduler discards any token a row samples without its partner (see ``docs/vllm.md``).

Per-request settings, in ``SamplingParams.extra_args`` (``vllm_xargs`` when served):

* ``guidance_scale``: ``w`` in ``u + w (c - u)``, a finite number; 1 (or absent) is off and
  the request runs exactly as plain vLLM;
* ``negative_prompt`` (text, tokenised in the engine like a completion prompt) or
  ``negative_prompt_token_ids`` (a list of token ids): the unconditional context;
* ``typical_p`` (optional): applied to the guided scores (see :mod:`guidance.vllm.typical`).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor

from guidance.validation import check_finite, check_int
from guidance.vllm._rows import RowTable, admission_check
from guidance.vllm.sampling import RowSettings, decide_tokens
from guidance.vllm.typical import typical_settings
from samplers.kernels import cfg_log_softmax  # guidance.ops.cfg_log_probs, fused into one kernel on CUDA

__all__ = [
    "CFG_KEYS",
    "CFGLogitsProcessor",
    "CFGSettings",
    "PAIR_KEY",
    "ROLE_KEY",
    "cfg_settings",
]

CFG_KEYS = ("guidance_scale", "negative_prompt", "negative_prompt_token_ids")
#: Keys the scheduler adds to a pair's ``extra_args`` (refused from users).
PAIR_KEY = "_guidance_pair"
ROLE_KEY = "_guidance_role"


@dataclass(frozen=True)
class CFGSettings:
    """A request's CFG settings: the scale and the negative prompt (text or ids, or neither)."""

    scale: float
    negative_prompt: str | None = None
    negative_prompt_token_ids: tuple[int, ...] | None = None


def _unsupported(params: SamplingParams) -> str | None:
    if params.logit_bias:
        return "`logit_bias` (vLLM adds it to the conditional logits before guidance)"
    if params.prompt_logprobs is not None:
        return "`prompt_logprobs`"
    return None


def cfg_settings(params: SamplingParams | None) -> CFGSettings | None:
    """The CFG settings in ``params.extra_args``, or None when the request is not guided (scale 1 or absent).

    Raises ``TypeError``/``ValueError`` naming the argument for bad values, for the private
    pairing keys, and for the vLLM features CFG does not support.

    Example:
        >>> from vllm import SamplingParams
        >>> from guidance.vllm.cfg import cfg_settings
        >>> cfg_settings(SamplingParams(extra_args={"guidance_scale": 1.5, "negative_prompt": "boring"}))
        CFGSettings(scale=1.5, negative_prompt='boring', negative_prompt_token_ids=None)
        >>> cfg_settings(SamplingParams(extra_args={"guidance_scale": 1})) is None
        True
    """
    extra = (params.extra_args if params is not None else None) or {}
    if PAIR_KEY in extra or ROLE_KEY in extra:
        raise ValueError(f"`{PAIR_KEY}` and `{ROLE_KEY}` are set by the engine; remove them from extra_args.")
    has_negative = "negative_prompt" in extra or "negative_prompt_token_ids" in extra
    if "guidance_scale" not in extra:
        if has_negative:
            raise ValueError("A negative prompt needs `guidance_scale` in extra_args.")
        return None
    scale = check_finite(extra["guidance_scale"], "guidance_scale")
    text, ids = extra.get("negative_prompt"), extra.get("negative_prompt_token_ids")
    if text is not None and ids is not None:
        raise ValueError("Pass `negative_prompt` or `negative_prompt_token_ids`, not both.")
    if text is not None and (not isinstance(text, str) or not text):
        raise TypeError(f"`negative_prompt` must be a non-empty string, got {text!r}.")
    if ids is not None:
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__") or len(ids) == 0:
            raise TypeError(f"`negative_prompt_token_ids` must be a non-empty list of token ids, got {ids!r}.")
        ids = tuple(check_int(i, "negative_prompt_token_ids[i]", minimum=0) for i in ids)
    if scale == 1.0:
        return None
    problem = _unsupported(params)
    if problem is not None:
        raise ValueError(f"{problem} is not supported with `guidance_scale`.")
    return CFGSettings(scale, text, ids)


@dataclass
class _Row:
    pair: str
    cond: bool
    scale: float = 1.0
    settings: RowSettings | None = None
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = None


def _row_settings(params: SamplingParams) -> RowSettings:
    typical = typical_settings(params)
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return RowSettings(
        temperature=float(params.temperature),
        top_k=int(params.top_k or 0),
        top_p=float(params.top_p),
        min_p=float(params.min_p),
        typical_p=1.0 if typical is None else typical[0],
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
        repetition_penalty=float(params.repetition_penalty),
        seed=int(seed),
    )


def _make_row(params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> _Row | None:
    extra = params.extra_args or {}
    pair = extra.get(PAIR_KEY)
    if pair is None:
        return None
    if extra.get(ROLE_KEY) != "cond":
        return _Row(pair=pair, cond=False)
    return _Row(
        pair=pair,
        cond=True,
        scale=float(extra["guidance_scale"]),
        settings=_row_settings(params),
        prompt_ids=list(prompt_ids or ()),
        output_ids=output_ids,
    )


class CFGLogitsProcessor(V1LogitsProcessor):
    r"""vLLM (V1 runner) logits processor that guides each CFG pair and makes both rows emit one token.

    For every pair whose two rows are in the step, the guided scores are
    ``log_softmax(u) + w (log_softmax(c) - log_softmax(u))`` (:func:`guidance.ops.cfg_log_probs`,
    the numbers of ``guidance.lm.cfg_generate``); the token is drawn from them with the
    request's penalties, temperature, min-p, ``typical_p``, top-k and top-p, in vLLM's order,
    greedy below temperature ``1e-5``, and both rows become one-hot on it. Rows of a pair whose
    partner is not in the step are left alone: the scheduler discards what they sample.

    It needs :class:`guidance.vllm.CFGScheduler` (which creates and pairs the companion
    requests) and must be the last custom processor that changes scores; use
    :func:`guidance.vllm.engine_kwargs` to get both. Requests without ``guidance_scale`` are
    untouched.

    Example (offline; an engine start takes about a minute on a CPU):

    ```python
    >>> from vllm import LLM, SamplingParams  # doctest: +SKIP
    >>> from guidance.vllm import default_model_folder, engine_kwargs  # doctest: +SKIP
    >>> llm = LLM(model=str(default_model_folder()), **engine_kwargs())  # doctest: +SKIP
    >>> params = SamplingParams(temperature=0, max_tokens=20, extra_args={"guidance_scale": 1.5})  # doctest: +SKIP
    >>> llm.generate(["Today a dragon flew over Paris"], params)[0].outputs[0].text  # doctest: +SKIP
    ```
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.table: RowTable[_Row] = RowTable()
        self.device = device

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        admission_check(cfg_settings, sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.table.update(batch_update, _make_row)

    def _pairs(self) -> list[tuple[int, int, _Row]]:
        conds: dict[str, tuple[int, _Row]] = {}
        unconds: dict[str, int] = {}
        for index, row in self.table.rows.items():
            if row.cond:
                conds[row.pair] = (index, row)
            else:
                unconds[row.pair] = index
        return [(index, unconds[pair], row) for pair, (index, row) in conds.items() if pair in unconds]

    def apply(self, logits: Tensor) -> Tensor:
        if not self.table.rows:
            return logits
        pairs = self._pairs()
        if not pairs:
            return logits
        cond_rows = torch.tensor([p[0] for p in pairs], device=logits.device)
        uncond_rows = torch.tensor([p[1] for p in pairs], device=logits.device)
        rows = [p[2] for p in pairs]
        scales = {row.scale for row in rows}
        # One scale for all pairs (the usual case) takes the cheaper scalar path of the same formula.
        scale = scales.pop() if len(scales) == 1 else torch.tensor([row.scale for row in rows], device=logits.device)
        guided = cfg_log_softmax(logits[cond_rows].float(), logits[uncond_rows].float(), scale)
        tokens = decide_tokens(
            guided,
            [row.settings for row in rows],
            [row.prompt_ids for row in rows],
            [row.output_ids for row in rows],
        )
        both = torch.cat([cond_rows, uncond_rows])
        logits.index_fill_(0, both, -math.inf)
        logits[both, tokens.to(logits.device).repeat(2)] = 0.0
        return logits
