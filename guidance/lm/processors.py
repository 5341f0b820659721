"""``LogitsProcessor`` forms of CFG, for unconditional logits that come from elsewhere.

Use these when the unconditional distribution is not the same model on another context,
for example a plain language model guiding a captioning model (Kornblith et al.), or when
you want CFG inside someone else's decoding loop. For the usual case (same model, last
prompt token or a negative prompt) :func:`guidance.cfg_generate` is faster: it batches both
branches into one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import LongTensor, Tensor
from transformers import DynamicCache, LogitsProcessor

from guidance import ops
from guidance.lm import compat
from guidance.lm.generation_state import GenerationTracker
from guidance.lm.padding import position_ids
from guidance.schedules import Schedule, as_schedule

__all__ = ["CFGLogitsProcessor", "ModelUnconditionalLogits"]


class ModelUnconditionalLogits:
    r"""Next-token logits of a causal LM on an unconditional context, with its own KV cache.

    Called once per decoding step with the current sequences; it feeds the model the
    tokens generated since its last call, so each step costs one single-token forward.
    A call that does not continue the previous one (another prompt or batch, see
    :mod:`guidance.lm.generation_state`) starts over from the context, so one object serves
    several ``generate`` calls.

    Args:
        model: a transformers causal LM whose vocabulary matches the guided model's.
        context_ids (`LongTensor` of shape `(1 or batch, length)`, *optional*): the unconditional
            context, left-padded. Defaults to the last token of the prompt.
        context_attention_mask (`LongTensor`, *optional*): mask of `context_ids`.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from guidance.lm import ModelUnconditionalLogits
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
        >>> uncond = ModelUnconditionalLogits(lm)
        >>> uncond(torch.tensor([[3, 5, 7]])).shape  # first call: the context (here the last prompt token)
        torch.Size([1, 32])
        >>> uncond(torch.tensor([[3, 5, 7, 9]])).shape  # later calls: only the new token is fed
        torch.Size([1, 32])
    """

    def __init__(self, model: Any, context_ids: Tensor | None = None, context_attention_mask: Tensor | None = None):
        self.model = model
        self.context_ids = context_ids
        self.context_attention_mask = context_attention_mask
        self.reset()

    def reset(self) -> None:
        """Forget the cache. Needed only between ``generate`` calls that the rule of
        :mod:`guidance.lm.generation_state` cannot tell apart (a prompt that is the previous
        call's sequences plus one token)."""
        self._cache: DynamicCache | None = None
        self._mask: Tensor | None = None
        self._seen: int = 0
        self._tracker = GenerationTracker()

    @torch.no_grad()
    def __call__(self, input_ids: LongTensor) -> Tensor:
        device = next(self.model.parameters()).device
        if self._tracker.update(input_ids):  # a new generation: start from the context again
            self._cache = None
        if self._cache is None:
            rows = input_ids.shape[0]
            if self.context_ids is None:
                ids = input_ids[:, -1:]
                mask = torch.ones_like(ids)
            else:
                ids = self.context_ids
                mask = torch.ones_like(ids) if self.context_attention_mask is None else self.context_attention_mask
                if ids.shape[0] == 1 and rows > 1:
                    ids, mask = ids.expand(rows, -1), mask.expand(rows, -1)
                elif ids.shape[0] != rows:
                    raise ValueError(
                        f"`context_ids` has {ids.shape[0]} rows; it must have 1 or {rows} (the batch size)."
                    )
            self._cache = DynamicCache(config=self.model.config)
            self._mask = mask.to(device=device, dtype=torch.long)
            new_ids = ids.to(device)
        else:
            new_tokens = input_ids.shape[1] - self._seen
            new_ids = input_ids[:, -new_tokens:].to(device)
            assert self._mask is not None
            self._mask = torch.cat([self._mask, torch.ones_like(new_ids)], dim=1)
        self._seen = input_ids.shape[1]
        positions = position_ids(self._mask)[:, -new_ids.shape[1] :]
        out = self.model(
            input_ids=new_ids,
            attention_mask=self._mask,
            position_ids=positions,
            use_cache=True,
            **{compat.cache_argument(self.model): self._cache},
        )
        return out.logits[:, -1].float()


class CFGLogitsProcessor(LogitsProcessor):
    r"""Classifier-free guidance against unconditional logits that you supply.

    At each step the incoming scores are the conditional logits ``z_c``; ``unconditional_logits``
    returns ``z_u`` for the current sequences; the output is
    ``log_softmax(z_u) + w (log_softmax(z_c) - log_softmax(z_u))`` (``cfg_form="log_probs"``,
    Sanchez et al.) or ``z_u + w (z_c - z_u)`` (``cfg_form="logits"``). Put it first in the
    processor list, as transformers does with its own CFG processor, so that the other
    processors see guided scores. With scale 1 the scores pass through unchanged.

    Args:
        guidance_scale (`float`): ``w``; 1 is off. Ignored when `guidance_schedule` is given.
        unconditional_logits (`Callable[[LongTensor], Tensor]`): maps the current sequences
            ``(batch, length)`` to unconditional next-token logits ``(batch, vocab)``, e.g. a
            :class:`ModelUnconditionalLogits`.
        cfg_form (`str`): ``"log_probs"`` (default) or ``"logits"``.
        guidance_schedule: a schedule over generated tokens; needs `num_steps`.
        num_steps (`int`, *optional*): ``max_new_tokens``, for schedules that need it.

    Example:
        >>> import torch
        >>> from guidance.lm import CFGLogitsProcessor
        >>> processor = CFGLogitsProcessor(2.0, unconditional_logits=lambda ids: torch.zeros(1, 3))
        >>> processor(torch.tensor([[1, 2]]), torch.tensor([[1.0, 0.0, 0.0]])).argmax(-1)
        tensor([0])
    """

    def __init__(
        self,
        guidance_scale: float,
        unconditional_logits: Callable[[LongTensor], Tensor],
        cfg_form: str = "log_probs",
        guidance_schedule: Schedule | Callable[..., float] | None = None,
        num_steps: int | None = None,
    ):
        ops.validate_scale(guidance_scale, "guidance_scale")
        if cfg_form not in ("log_probs", "logits"):
            raise ValueError(f"`cfg_form` must be 'log_probs' or 'logits', got {cfg_form!r}.")
        if not callable(unconditional_logits):
            raise ValueError("`unconditional_logits` must be callable: (input_ids) -> logits of shape (batch, vocab).")
        self.schedule = as_schedule(guidance_schedule if guidance_schedule is not None else guidance_scale)
        self.unconditional_logits = unconditional_logits
        self.combine = ops.cfg_log_probs if cfg_form == "log_probs" else ops.cfg_logits
        self.num_steps = num_steps
        self._tracker = GenerationTracker()  # the schedule's step counts from each generation's prompt

    def __call__(self, input_ids: LongTensor, scores: Tensor) -> Tensor:
        self._tracker.update(input_ids)
        scale = float(self.schedule(self._tracker.step, self.num_steps, None))
        ops.validate_scale(scale, "guidance_schedule(step)")
        uncond = self.unconditional_logits(input_ids)
        if uncond.shape != scores.shape:
            raise ValueError(
                f"`unconditional_logits` returned shape {tuple(uncond.shape)}; expected {tuple(scores.shape)} "
                "(same batch and vocabulary as the guided model)."
            )
        if bool(torch.isnan(uncond).any()):
            raise ValueError("`unconditional_logits` returned NaN.")
        return self.combine(scores, uncond.to(device=scores.device, dtype=scores.dtype), scale)
