"""The two CFG branches as one batch through a causal LM, with one KV cache.

:class:`TwoBranchForward` owns the ``2R`` rows (``R`` conditional rows, then ``R``
unconditional ones), their attention mask, position ids and ``DynamicCache``, and feeds
the model through its public ``forward``. Decoding loops ask it for the next-token logits
of both branches, append the chosen tokens, reorder rows (beam search) and drop the
unconditional rows when guidance is off for the rest of the sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import LongTensor, Tensor
from transformers import DynamicCache

from guidance.lm import compat
from guidance.lm.batching import GuidedBatch

__all__ = ["OutputRecord", "TwoBranchForward"]


class TwoBranchForward:
    """One forward per step for the conditional and unconditional rows of CFG decoding.

    Args:
        model: a transformers causal LM.
        batch (`GuidedBatch`): the left-padded ``2R`` prompt batch (see
            :func:`guidance.lm.batching.build_guided_batch`).
        forward_kwargs (`dict`): extra keyword arguments for every ``forward`` call
            (``output_attentions``, ``logits_to_keep``, ...); never batch-shaped tensors.
    """

    def __init__(self, model: Any, batch: GuidedBatch, forward_kwargs: dict[str, Any] | None = None):
        self.model = model
        self.rows = batch.rows
        self.guided = True
        self.cache = DynamicCache(config=model.config)
        self._cache_argument = compat.cache_argument(model)
        self._forward_kwargs = dict(forward_kwargs or {})
        self._mask = batch.attention_mask
        self._pending = batch.input_ids
        self._positions = batch.position_ids

    def __call__(self) -> Any:
        """Run the model on the pending tokens (the prompts first, then one token per row)."""
        kwargs = {self._cache_argument: self.cache, **self._forward_kwargs}
        return self.model(
            input_ids=self._pending,
            attention_mask=self._mask,
            position_ids=self._positions,
            use_cache=True,
            return_dict=True,
            **kwargs,
        )

    def next_scores(
        self, outputs: Any, scale: float, combine: Callable[[Tensor, Tensor, float], Tensor], step: int
    ) -> tuple[Tensor, Tensor]:
        """``(guided next-token scores, conditional logits)`` in float32 from a forward's ``outputs``.

        Once guidance is off the scores are the conditional logits themselves. ``step`` (the
        generated token's index) only names the step in the error raised for NaN logits.
        """
        cond, uncond = self.next_logits(outputs, step)
        return (cond if uncond is None else combine(cond, uncond, scale)), cond

    def next_logits(self, outputs: Any, step: int) -> tuple[Tensor, Tensor | None]:
        """``(conditional, unconditional)`` next-token logits in float32; ``None`` once guidance is off."""
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=self._mask.device)
        if bool(torch.isnan(logits).any()):
            raise ValueError(f"The model produced NaN logits at generated token {step}; guidance cannot be applied.")
        return self.split(logits)

    def split(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(conditional, unconditional)`` rows of a ``(rows, ...)`` output; ``None`` once guidance is off."""
        if not self.guided:
            return logits, None
        return logits[: self.rows], logits[self.rows :]

    def append(self, tokens: LongTensor) -> None:
        """Queue the next token of every conditional row (the unconditional rows get the same token)."""
        if self.guided:
            tokens = torch.cat([tokens, tokens])
        self._pending = tokens[:, None]
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
        self._positions = self._positions[:, -1:] + 1

    def reorder(self, index: LongTensor) -> None:
        """Row ``i`` becomes former conditional row ``index[i]`` in both branches (beam search)."""
        full = torch.cat([index, index + self.rows]) if self.guided else index
        self._select(full)

    def mark_unfinished(self, unfinished: Tensor) -> None:
        """Rows that finished (``unfinished == 0``) stay in the batch, as in ``generate``; adaptive guidance drops them."""

    def drop_unconditional(self) -> None:
        """Guidance is off for the rest of the sequence: keep only the conditional rows."""
        if self.guided:
            self._select(torch.arange(self.rows, device=self._mask.device))
            self.guided = False

    def _select(self, index: LongTensor) -> None:
        self.cache.reorder_cache(index.to(self._mask.device))
        self._mask = self._mask[index]
        self._positions = self._positions[index]
        self._pending = self._pending[index]


class OutputRecord:
    """What ``return_dict_in_generate`` collects step by step, for the conditional rows.

    Args:
        forward (`TwoBranchForward`): the runner whose outputs are recorded (to find the conditional rows).
        generation_config (`GenerationConfig`): reads ``return_dict_in_generate``, ``output_scores``,
            ``output_logits``, ``output_attentions`` and ``output_hidden_states``.
    """

    def __init__(self, forward: TwoBranchForward, generation_config: Any):
        want = bool(generation_config.return_dict_in_generate)
        self.forward = forward
        self.want_dict = want
        self.scores: tuple[Tensor, ...] | None = () if want and generation_config.output_scores else None
        self.logits: tuple[Tensor, ...] | None = () if want and generation_config.output_logits else None
        self.attentions: tuple[Any, ...] | None = () if want and generation_config.output_attentions else None
        self.hidden_states: tuple[Any, ...] | None = () if want and generation_config.output_hidden_states else None

    def add(self, outputs: Any, scores: Tensor, logits: Tensor) -> None:
        """Record one step: processed ``scores``, raw conditional ``logits`` and the model's extra outputs."""
        if self.scores is not None:
            self.scores += (scores,)
        if self.logits is not None:
            self.logits += (logits,)
        if self.attentions is not None:
            self.attentions += (self._cond_rows(outputs.attentions),)
        if self.hidden_states is not None:
            self.hidden_states += (self._cond_rows(outputs.hidden_states),)

    def _cond_rows(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            return self.forward.split(value)[0]
        if isinstance(value, Sequence) and not isinstance(value, str):
            return type(value)(self._cond_rows(item) for item in value)
        return value
