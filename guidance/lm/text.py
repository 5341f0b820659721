"""Strings in, strings out: CFG generation for users who would rather not touch ``generate``.

Nothing here changes the caller's objects: the tokenizer is only read (prompts are padded
here, with its pad id, else its EOS id), and with a ``seed`` or ``generator`` sampling draws
from a private generator (:mod:`guidance.lm.sampling`), so torch's global generator is
neither reseeded nor advanced.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from guidance.lm.generate import cfg_generate
from guidance.lm.padding import left_pad
from guidance.schedules import Schedule
from guidance.validation import check_int

if TYPE_CHECKING:
    from guidance.lm.adaptive import AdaptiveStats

__all__ = ["GenerationResult", "encode_prompts", "generate_text", "pad_token_id"]


@dataclass
class GenerationResult:
    """Decoded continuations with their timing.

    Args:
        texts (`list[str]`): one continuation per prompt (the prompt itself not included).
        new_tokens (`int`, >= 1): generated tokens over all rows, padding not counted.
        seconds (`float`, >= 0): wall time of ``generate``.
        adaptive_stats (`AdaptiveStats`, *optional*): with ``guidance_adaptive=``, what adaptive
            CFG computed per row (unconditional positions, decisions); ``None`` otherwise and
            when guidance was off (scale 1: nothing unconditional runs).

    Example:
        >>> from guidance.lm import GenerationResult
        >>> GenerationResult(texts=["hello"], new_tokens=10, seconds=2.0).tokens_per_second
        5.0
    """

    texts: list[str]
    new_tokens: int
    seconds: float
    adaptive_stats: AdaptiveStats | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def _uses_chat_template(tokenizer: Any, chat: bool | None) -> bool:
    if chat is None:
        return getattr(tokenizer, "chat_template", None) is not None
    return chat


def pad_token_id(tokenizer: Any) -> int:
    """The id used to pad prompts: the tokenizer's pad id, else its EOS id, else 0 (read only).

    Example:
        >>> from types import SimpleNamespace
        >>> from guidance.lm.text import pad_token_id
        >>> pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2))
        2
    """
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            return candidate
    return 0


def encode_prompts(
    tokenizer: Any, prompts: str | Sequence[str], chat: bool | None = None
) -> dict[str, torch.Tensor]:
    """Tokenise ``prompts`` left-padded, through the chat template when the tokenizer has one.

    The tokenizer is not modified: padding uses :func:`pad_token_id`.

    Args:
        tokenizer: a transformers tokenizer.
        prompts (`str | Sequence[str]`): one or more non-empty prompts.
        chat (`bool`, *optional*): apply the chat template (True), do not (False), or apply
            it when the tokenizer has one (None, default).

    Returns ``{"input_ids", "attention_mask"}``, ``(len(prompts), longest)`` long tensors.

    Example:
        >>> from transformers import BertTokenizerFast
        >>> from guidance.lm import encode_prompts
        >>> from guidance.models.sentiment import encoder_path
        >>> tokenizer = BertTokenizerFast.from_pretrained(encoder_path())
        >>> encode_prompts(tokenizer, ["good day", "day"], chat=False)["attention_mask"]
        tensor([[1, 1],
                [0, 1]])
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("`prompts` must be a non-empty list of non-empty strings.")
    if _uses_chat_template(tokenizer, chat):
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    input_ids, attention_mask = left_pad(encoded, pad_token_id(tokenizer))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _private_generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("Pass either `seed` or `generator`, not both.")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
        if generator.device.type != device.type:
            raise ValueError(
                f"`generator` is on {generator.device}; it must be on the model's device type ({device.type})."
            )
        return generator
    if seed is None:
        return None
    seed = check_int(seed, "seed", minimum=0, maximum=2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def _guidance_kwargs(
    tokenizer: Any,
    prompt_count: int,
    negative_prompts: str | Sequence[str] | None,
    guidance_scale: float,
    guidance_schedule: Schedule | Callable[..., float] | None,
    chat: bool | None,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if guidance_schedule is not None:
        kwargs["guidance_schedule"] = guidance_schedule
    else:
        kwargs["guidance_scale"] = guidance_scale
    if negative_prompts is not None:
        negatives = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
        if len(negatives) not in (1, prompt_count):
            raise ValueError(
                f"`negative_prompts` has {len(negatives)} entries; it must have 1 or {prompt_count} (one per prompt)."
            )
        encoded = encode_prompts(tokenizer, negatives, chat)
        kwargs["cfg_negative_prompt_ids"] = encoded["input_ids"]  # reaches cfg_generate with a schedule too
        kwargs["cfg_negative_prompt_attention_mask"] = encoded["attention_mask"]
    return kwargs


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
    generator: torch.Generator | None = None,
    streamer: Any = None,
    **generate_kwargs: Any,
) -> GenerationResult:
    """Generate guided continuations of ``prompts`` with :func:`guidance.cfg_generate`.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer (only read, never modified).
        prompts (`str | Sequence[str]`): one prompt or a list of non-empty prompts.
        negative_prompts (`str | Sequence[str]`, *optional*): one for all prompts or one per
            prompt; they replace the default unconditional context (the last prompt token).
        guidance_scale (`float`): ``w`` in ``u + w (c - u)``, any finite number; 1 is off.
            Default 1.5. Ignored when ``guidance_schedule`` is given.
        guidance_schedule (*optional*): a :mod:`guidance.schedules` schedule over new tokens.
        chat (`bool`, *optional*): use the chat template for prompts and negative prompts
            (default: when the tokenizer has one), so both contexts end the same way.
        max_new_tokens (`int`, >= 1): tokens to generate per prompt. Default 64.
        seed (`int`, in ``[0, 2**63)``, *optional*): sample from a private generator seeded
            with it; the same seed gives the same text.
        generator (`torch.Generator`, *optional*): sample from this generator (on the model's
            device type) instead; not with ``seed``.
        streamer (*optional*): a transformers streamer.
        **generate_kwargs: passed to ``model.generate`` (``do_sample``, ``temperature``,
            ``typical_p``, ``logits_processor``, ``guidance_adaptive``, ...). With
            ``guidance_adaptive`` the result's ``adaptive_stats`` holds the per-row counts.

    With neither ``seed`` nor ``generator``, sampling draws from torch's global generator,
    exactly as ``model.generate`` does. With either, the global generator is neither read
    nor advanced (see :mod:`guidance.lm.sampling`), so concurrent callers need no lock.

    Example:
        >>> import torch
        >>> from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM
        >>> from guidance.lm import generate_text
        >>> from guidance.models.sentiment import encoder_path
        >>> tokenizer = BertTokenizerFast.from_pretrained(encoder_path())  # any tokenizer will do here
        >>> _ = torch.manual_seed(0)
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
        ...                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...                                   pad_token_id=0)).eval()
        >>> state = torch.get_rng_state()
        >>> first = generate_text(lm, tokenizer, ["a happy day", "rain"], negative_prompts="sad", guidance_scale=2.0,
        ...                       max_new_tokens=4, do_sample=True, seed=0)
        >>> again = generate_text(lm, tokenizer, ["a happy day", "rain"], negative_prompts="sad", guidance_scale=2.0,
        ...                       max_new_tokens=4, do_sample=True, seed=0)
        >>> len(first.texts), first.texts == again.texts, torch.equal(state, torch.get_rng_state())
        (2, True, True)

        On the embedded model (converted on first use):

        >>> from guidance.models import load_default_lm  # doctest: +SKIP
        >>> from guidance.lm import generate_text  # doctest: +SKIP
        >>> model, tokenizer = load_default_lm()  # doctest: +SKIP
        >>> generate_text(model, tokenizer, "Write a haiku about the sea.", guidance_scale=1.5).texts  # doctest: +SKIP
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    inputs = encode_prompts(tokenizer, prompt_list, chat)
    kwargs = dict(generate_kwargs)
    kwargs.update(
        _guidance_kwargs(
            tokenizer, len(prompt_list), negative_prompts, guidance_scale, guidance_schedule, chat
        )
    )
    device = next(model.parameters()).device
    private = _private_generator(seed, generator, device)
    if private is not None:
        kwargs["generator"] = private
    pad = pad_token_id(tokenizer)
    kwargs.setdefault("pad_token_id", pad)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if kwargs.get("guidance_adaptive") is not None:
        kwargs["return_dict_in_generate"] = True  # the output carries adaptive_stats
    start = time.perf_counter()
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, custom_generate=cfg_generate, cfg_streamer=streamer, **kwargs
    )
    seconds = time.perf_counter() - start
    stats = getattr(output, "adaptive_stats", None)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    new = sequences[:, inputs["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    new_tokens = int((new != kwargs["pad_token_id"]).sum())
    return GenerationResult(texts=texts, new_tokens=max(new_tokens, 1), seconds=seconds, adaptive_stats=stats)
