"""Strings in, strings out: CFG generation for users who would rather not touch ``generate``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from guidance.lm.generate import cfg_generate
from guidance.schedules import Schedule

__all__ = ["GenerationResult", "encode_prompts", "generate_text"]


@dataclass
class GenerationResult:
    """Decoded continuations with their timing."""

    texts: list[str]
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def _uses_chat_template(tokenizer: Any, chat: bool | None) -> bool:
    if chat is None:
        return getattr(tokenizer, "chat_template", None) is not None
    return chat


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool | None = None) -> dict[str, torch.Tensor]:
    """Tokenise ``prompts`` left-padded, through the chat template when the tokenizer has one (``chat=None``)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("`prompts` must be a non-empty list of non-empty strings.")
    if _uses_chat_template(tokenizer, chat):
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return dict(tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False))
    finally:
        tokenizer.padding_side = side


def generate_text(
    model: Any,
    tokenizer: Any,
    prompts: str | Sequence[str],
    *,
    negative_prompts: str | Sequence[str] | None = None,
    guidance_scale: float = 1.5,
    guidance_schedule: Schedule | Callable[..., float] | None = None,
    chat: bool | None = None,
    max_new_tokens: int = 64,
    seed: int | None = None,
    streamer: Any = None,
    **generate_kwargs: Any,
) -> GenerationResult:
    """Generate guided continuations of ``prompts``.

    ``negative_prompts`` (one for all, or one per prompt) replace the default unconditional
    context (the last prompt token). With a chat tokenizer both prompts and negative prompts
    go through the chat template, so the guided and unguided contexts end in the same way.
    Other keyword arguments go to ``model.generate`` (``do_sample``, ``temperature``,
    ``typical_p``, ...).

    Example:
        >>> from guidance.models import load_default_lm  # doctest: +SKIP
        >>> from guidance.lm import generate_text  # doctest: +SKIP
        >>> model, tokenizer = load_default_lm()  # doctest: +SKIP
        >>> generate_text(model, tokenizer, "Write a haiku about the sea.", guidance_scale=1.5).texts  # doctest: +SKIP
    """
    single = isinstance(prompts, str)
    prompt_list = [prompts] if single else list(prompts)
    inputs = encode_prompts(tokenizer, prompt_list, chat)
    kwargs: dict[str, Any] = dict(generate_kwargs)
    if guidance_schedule is not None:
        kwargs["guidance_schedule"] = guidance_schedule
    else:
        kwargs["guidance_scale"] = guidance_scale
    if negative_prompts is not None:
        negatives = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
        if len(negatives) not in (1, len(prompt_list)):
            raise ValueError(
                f"`negative_prompts` has {len(negatives)} entries; it must have 1 or {len(prompt_list)} (one per prompt)."
            )
        encoded = encode_prompts(tokenizer, negatives, chat)
        kwargs["cfg_negative_prompt_ids"] = encoded["input_ids"]  # reaches cfg_generate with a schedule too
        kwargs["cfg_negative_prompt_attention_mask"] = encoded["attention_mask"]
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if seed is not None:
        torch.manual_seed(seed)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    start = time.perf_counter()
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, custom_generate=cfg_generate, cfg_streamer=streamer, **kwargs
    )
    seconds = time.perf_counter() - start
    new = output[:, inputs["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    pad = tokenizer.pad_token_id
    new_tokens = int((new != pad).sum()) if pad is not None else new.numel()
    return GenerationResult(texts=texts, new_tokens=max(new_tokens, 1), seconds=seconds)
