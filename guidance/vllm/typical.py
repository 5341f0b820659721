"""Locally typical sampling (``typical_p``) as a vLLM logits processor.

vLLM has no ``typical_p``. :class:`TypicalLogitsProcessor` reads it per request from
``SamplingParams(extra_args={"typical_p": 0.9})`` (``"vllm_xargs": {"typical_p": 0.9}`` on the
OpenAI server) and applies :func:`samplers.kernels.typical_filter`, the exact, sort-free
filter behind :class:`samplers.LocallyTypicalWarper`: on the same scores it keeps the same
tokens. One class serves both of vLLM's model runners:

* V1 runner (``vllm.v1.sample.logits_processor``): declared argmax-invariant, so vLLM runs it
  only for sampled rows, after penalties, temperature and min-p and before top-k/top-p, and
  never for greedy rows (as transformers ignores ``typical_p`` when not sampling);
* Model Runner V2 (``vllm.v1.worker.gpu.sample.logits_processor``): V2 calls processors before
  temperature, so the kept set is computed on ``scores / temperature`` and the other tokens
  of the untempered row are masked: the same set as after temperature.

``min_tokens_to_keep`` (default 1) may be given as ``extra_args["typical_min_tokens_to_keep"]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from guidance.validation import check_int, check_range
from guidance.vllm._rows import RowTable, admission_check
from guidance.vllm.sampling import GREEDY_EPS
from samplers.kernels import typical_filter

__all__ = ["TYPICAL_KEYS", "TypicalLogitsProcessor", "typical_settings"]

TYPICAL_KEYS = ("typical_p", "typical_min_tokens_to_keep")


def typical_settings(params: SamplingParams | None) -> tuple[float, int] | None:
    """``(typical_p, min_tokens_to_keep)`` from ``params.extra_args``, or None when off (absent or 1).

    Raises ``ValueError``/``TypeError`` naming the argument for a value out of range.

    Example:
        >>> from vllm import SamplingParams
        >>> from guidance.vllm.typical import typical_settings
        >>> typical_settings(SamplingParams(extra_args={"typical_p": 0.9}))
        (0.9, 1)
        >>> typical_settings(SamplingParams()) is None
        True
    """
    extra = (params.extra_args if params is not None else None) or {}
    if "typical_p" not in extra:
        if "typical_min_tokens_to_keep" in extra:
            raise ValueError("`typical_min_tokens_to_keep` needs `typical_p` in extra_args.")
        return None
    mass = check_range(extra["typical_p"], "typical_p", 0.0, 1.0, lo_open=True)
    keep = check_int(extra.get("typical_min_tokens_to_keep", 1), "typical_min_tokens_to_keep", minimum=1)
    return None if mass >= 1.0 else (mass, keep)


def _filter_rows(logits: Tensor, rows: list[int], settings: list[tuple[float, int]], temperatures: list[float] | None) -> None:
    """Mask, in place, the tokens outside each row's typical set (rows sharing settings batched)."""
    groups: dict[tuple[float, int, float], list[int]] = {}
    for position, (row, setting) in enumerate(zip(rows, settings, strict=True)):
        temperature = 1.0 if temperatures is None else temperatures[position]
        groups.setdefault((*setting, temperature), []).append(row)
    for (mass, keep, temperature), members in groups.items():
        index = torch.tensor(members, device=logits.device)
        scores = logits.index_select(0, index)
        tempered = scores if temperature == 1.0 else scores / temperature
        kept = torch.isfinite(typical_filter(tempered.float(), mass, keep))
        logits.index_copy_(0, index, scores.masked_fill(~kept, -math.inf))


class TypicalLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    r"""vLLM logits processor for locally typical sampling from ``extra_args["typical_p"]``.

    Keeps, for each sampled request that sets ``typical_p`` in (0, 1), the smallest set of
    tokens in ascending order of ``|-log p - H|`` whose mass reaches ``typical_p`` (the
    crossing token and its ties kept, at least ``typical_min_tokens_to_keep``); the others
    become ``-inf``. Requests without ``typical_p`` (or with 1) and greedy requests are left
    untouched. Invalid values are refused at request admission (HTTP 400 when served).

    Register it with ``vllm.LLM(..., logits_processors=[TypicalLogitsProcessor])`` or
    ``vllm serve MODEL --logits-processors guidance.vllm.typical:TypicalLogitsProcessor``.

    Example (offline; an engine start takes about a minute on a CPU):

    ```python
    >>> from vllm import LLM, SamplingParams  # doctest: +SKIP
    >>> from guidance.vllm import TypicalLogitsProcessor, default_model_folder  # doctest: +SKIP
    >>> llm = LLM(model=str(default_model_folder()), logits_processors=[TypicalLogitsProcessor])  # doctest: +SKIP
    >>> params = SamplingParams(temperature=1.0, seed=0, max_tokens=20, extra_args={"typical_p": 0.9})  # doctest: +SKIP
    >>> llm.generate(["Once upon a time"], params)[0].outputs[0].text  # doctest: +SKIP
    ```
    """

    def __init__(self, vllm_config: Any, *runner_args: Any) -> None:
        # V1 passes (vllm_config, device, is_pin_memory); V2 passes (vllm_config, req_states).
        self.table: RowTable[tuple[float, int]] = RowTable()
        self.slots: dict[int, tuple[float, int, float]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        admission_check(typical_settings, sampling_params)

    # -- V1 runner ---------------------------------------------------------------------------

    def is_argmax_invariant(self) -> bool:
        # It can change the argmax, which is why it must not run for greedy rows: declaring it
        # invariant makes vLLM run it only when sampling, after temperature (transformers' order).
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.table.update(batch_update, lambda params, _prompt, _output: typical_settings(params))

    def apply(self, logits: Tensor, ctx: Any = None) -> Tensor:
        if ctx is not None:
            return self._apply_v2(logits, ctx)
        if not self.table.rows:
            return logits
        rows = sorted(self.table.rows)
        _filter_rows(logits, rows, [self.table.rows[r] for r in rows], None)
        return logits

    # -- Model Runner V2 ---------------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        setting = typical_settings(sampling_params)
        temperature = float(sampling_params.temperature)
        if setting is None or temperature < GREEDY_EPS:
            self.slots.pop(req_idx, None)
            return False
        self.slots[req_idx] = (*setting, temperature)
        return True

    def _apply_v2(self, logits: Tensor, ctx: Any) -> Tensor:
        if not self.slots:
            return logits
        slots = ctx.expanded_idx_mapping.tolist()
        rows = [row for row, slot in enumerate(slots) if slot in self.slots]
        if rows:
            chosen = [self.slots[slots[row]] for row in rows]
            _filter_rows(logits, rows, [c[:2] for c in chosen], [c[2] for c in chosen])
        return logits
