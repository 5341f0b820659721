"""Batched classifier-free guidance for transformers ``generate``.

``cfg_generate`` is a ``custom_generate`` callable (transformers >= 5)::

    from guidance import cfg_generate
    out = model.generate(**inputs, guidance_scale=1.5, negative_prompt_ids=neg_ids,
                         negative_prompt_attention_mask=neg_mask, custom_generate=cfg_generate)

transformers' own CFG (``UnbatchedClassifierFreeGuidanceLogitsProcessor``) runs the
unconditional context as a second, sequential forward per token. Here the conditional and
unconditional rows share ONE forward per step: one ``2B`` batch and one KV cache, with left
padding, attention masks and position ids that keep every row's positions right. When the
guidance schedule is off (scale 1) for all remaining tokens, the unconditional rows are
dropped from the batch and the cache, so their cost stops too.

The guided next-token scores use the log-prob form of Sanchez et al. (``cfg_form="log_probs"``,
the same numbers as transformers) or the raw-logit form (``cfg_form="logits"``); the
generation config's processors and warpers (repetition penalty, temperature, top-k/p, min-p,
typical, ...) then act on the guided scores, as in transformers.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import LongTensor, Tensor
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import (
    TypicalLogitsWarper,
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin

from guidance import ops
from guidance.lm.batching import build_guided_batch, expand_negative_prompt
from guidance.lm.sampling import sample_with_generator
from guidance.schedules import Constant, Schedule, as_schedule

__all__ = ["cfg_generate", "CFG_FORMS"]

CFG_FORMS = ("log_probs", "logits")
_SUPPORTED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


def _combine_fn(cfg_form: str) -> Callable[[Tensor, Tensor, float], Tensor]:
    if cfg_form == "logits":
        return ops.cfg_logits
    from samplers.kernels import cfg_log_softmax  # fused Triton kernel on CUDA, ops.cfg_log_probs elsewhere

    return cfg_log_softmax


def _generate_call_locals(model: Any) -> dict[str, Any]:
    """Arguments of the ``model.generate`` call that invoked us.

    transformers hands a callable ``custom_generate`` neither the ``streamer`` nor the raw
    ``negative_prompt_ids`` (it keeps only keyword arguments unknown to ``_sample``), so
    we read them from the calling ``generate`` frame. Empty if called some other way.
    """
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None
        for _ in range(8):
            if frame is None:
                break
            if frame.f_code.co_name == "generate" and frame.f_locals.get("self") is model:
                return dict(frame.f_locals)
            frame = frame.f_back
    finally:
        del frame
    return {}


def _take_transformers_cfg(
    logits_processor: LogitsProcessorList,
) -> tuple[LogitsProcessorList, float | None, Tensor | None, Tensor | None]:
    """Remove transformers' sequential CFG processor; return its scale and unconditional context."""
    kept = LogitsProcessorList()
    scale = negative_ids = negative_mask = None
    for processor in logits_processor:
        if isinstance(processor, UnbatchedClassifierFreeGuidanceLogitsProcessor):
            scale = float(processor.guidance_scale)
            negative_ids = processor.unconditional_context["input_ids"]
            negative_mask = processor.unconditional_context["attention_mask"]
        else:
            kept.append(processor)
    return kept, scale, negative_ids, negative_mask


def _use_sort_free_typical(logits_processor: LogitsProcessorList) -> LogitsProcessorList:
    """Swap transformers' sort-based typical warper for the exact, sort-free one (same semantics).

    It keeps the same tokens except where transformers' float32 running sum decides the boundary
    token wrongly (see :mod:`samplers.typical`); only used while guiding, so that guidance off
    stays bit-identical to plain ``generate``.
    """
    from samplers.typical import LocallyTypicalWarper

    return LogitsProcessorList(
        LocallyTypicalWarper(p.mass, p.min_tokens_to_keep, p.filter_value) if type(p) is TypicalLogitsWarper else p
        for p in logits_processor
    )


def _validate(model: Any, generation_config: GenerationConfig, model_kwargs: dict[str, Any], cfg_form: str) -> None:
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            "cfg_generate supports decoder-only (causal) language models; this model is encoder-decoder. "
            "Use transformers' `guidance_scale` for it."
        )
    mode = generation_config.get_generation_mode()
    if mode not in _SUPPORTED_MODES:
        raise ValueError(
            f"cfg_generate supports greedy search and sampling (num_beams=1), got generation mode {mode.value!r}. "
            "Beam search with CFG is not supported yet: set `num_beams=1`."
        )
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("cfg_generate needs `input_ids`; `inputs_embeds` is not supported.")
    if cfg_form not in CFG_FORMS:
        raise ValueError(f"`cfg_form` must be one of {CFG_FORMS}, got {cfg_form!r}.")


def _scales(schedule: Schedule, num_steps: int) -> list[float]:
    scales = [float(schedule(step, num_steps, None)) for step in range(num_steps)]
    for step, scale in enumerate(scales):
        if not math.isfinite(scale):
            raise ValueError(f"`guidance_schedule` must return finite scales; step {step} gave {scale}.")
    return scales


def _cond_half(value: Any, rows: int) -> Any:
    """Keep the conditional rows of a (nested tuple of) batched tensor(s)."""
    if isinstance(value, Tensor):
        return value[:rows]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return type(value)(_cond_half(item, rows) for item in value)
    return value


@torch.no_grad()
def cfg_generate(
    model: Any,
    input_ids: LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    guidance_schedule: Schedule | Callable[..., float] | float | None = None,
    cfg_form: str = "log_probs",
    generator: torch.Generator | None = None,
    **model_kwargs: Any,
) -> GenerateDecoderOnlyOutput | LongTensor:
    """Classifier-free guidance decoding with one batched forward per token.

    Pass it to ``generate`` as ``custom_generate=cfg_generate``; every usual ``generate``
    argument keeps its meaning. Guidance settings:

    - ``guidance_scale`` (generation config): ``w`` in ``u + w (c - u)``; 1 is off,
      ``0 < w < 1`` with a negative prompt moves towards it.
    - ``negative_prompt_ids`` / ``negative_prompt_attention_mask``: the unconditional
      context, left-padded; one row for all prompts, one per prompt, or one per returned
      sequence. Default: the last prompt token (Sanchez et al., transformers).
    - ``guidance_schedule``: a :mod:`guidance.schedules` schedule (or a callable
      ``(step, num_steps) -> scale``) over generated tokens, instead of ``guidance_scale``.
      ``num_steps`` is ``max_new_tokens``.
    - ``cfg_form``: ``"log_probs"`` (default; transformers' numbers) or ``"logits"``.
    - ``generator``: a ``torch.Generator`` to sample from instead of torch's global one
      (see :mod:`guidance.lm.sampling`).

    While guiding, the combine runs through :func:`samplers.kernels.cfg_log_softmax` (a fused
    Triton kernel on CUDA) and ``typical_p`` uses the exact, sort-free
    :class:`samplers.LocallyTypicalWarper` instead of transformers' sorting warper.

    Supported: greedy and sampling, batches, ``num_return_sequences``, the generation
    config's processors, warpers and stopping criteria, streamers, ``return_dict_in_generate``
    with ``output_scores``/``output_logits`` (the conditional rows). Beam search is rejected.
    With guidance off (scale 1 and no schedule) this is exactly transformers' own decoding.

    Example:
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer  # doctest: +SKIP
        >>> from guidance import cfg_generate  # doctest: +SKIP
        >>> inputs = tokenizer(["Today a dragon flew over Paris"], return_tensors="pt")  # doctest: +SKIP
        >>> out = model.generate(**inputs, guidance_scale=1.5, max_new_tokens=20,
        ...                      custom_generate=cfg_generate)  # doctest: +SKIP
    """
    caller = _generate_call_locals(model)
    if streamer is None:
        streamer = caller.get("streamer")
    logits_processor, processor_scale, negative_ids, negative_mask = _take_transformers_cfg(logits_processor)
    if negative_ids is None and caller.get("negative_prompt_ids") is not None:
        negative_ids = caller["negative_prompt_ids"]
        negative_mask = caller.get("negative_prompt_attention_mask")

    _validate(model, generation_config, model_kwargs, cfg_form)
    logits_processor, generation_config = sample_with_generator(generator, logits_processor, generation_config)
    if guidance_schedule is not None:
        if processor_scale is not None:
            raise ValueError("Pass either `guidance_scale` or `guidance_schedule`, not both.")
        schedule = as_schedule(guidance_schedule)
    else:
        scale = 1.0 if processor_scale is None else processor_scale
        ops.validate_scale(scale, "guidance_scale")
        schedule = Constant(scale)

    rows = input_ids.shape[0]
    num_return_sequences = max(1, generation_config.num_return_sequences or 1)
    if negative_ids is not None:
        negative_ids, negative_mask = expand_negative_prompt(
            negative_ids.to(input_ids.device),
            None if negative_mask is None else negative_mask.to(input_ids.device),
            rows // num_return_sequences,
            num_return_sequences,
        )
    num_steps = max(int(generation_config.max_length) - input_ids.shape[1], 0)
    scales = _scales(schedule, num_steps)
    if all(scale == 1.0 for scale in scales):
        # Guidance off: exactly transformers' own decoding loop.
        return GenerationMixin._sample(
            model,
            input_ids,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            generation_config=generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            **model_kwargs,
        )
    return _guided_loop(
        model,
        input_ids,
        _use_sort_free_typical(logits_processor),
        stopping_criteria,
        generation_config,
        streamer,
        scales,
        negative_ids,
        negative_mask,
        _combine_fn(cfg_form),
        model_kwargs,
    )


def _guided_loop(
    model: Any,
    input_ids: LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    streamer: Any,
    scales: list[float],
    negative_ids: Tensor | None,
    negative_mask: Tensor | None,
    combine: Callable[[Tensor, Tensor, float], Tensor],
    model_kwargs: dict[str, Any],
) -> GenerateDecoderOnlyOutput | LongTensor:
    rows = input_ids.shape[0]
    pad_token_id = generation_config._pad_token_tensor
    if pad_token_id is None:
        pad_token_id = generation_config._eos_token_tensor
    pad_value = 0 if pad_token_id is None else int(pad_token_id.reshape(-1)[0])
    batch = build_guided_batch(input_ids, model_kwargs.get("attention_mask"), negative_ids, negative_mask, pad_value)

    # Everything batch-shaped is rebuilt for the 2B rows; the cache is a fresh one for them.
    skip = {"attention_mask", "position_ids", "past_key_values", "cache_position", "use_cache"}
    guided_kwargs = {k: v for k, v in model_kwargs.items() if k not in skip and v is not None}
    guided_kwargs.update(
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        past_key_values=DynamicCache(config=model.config),
        use_cache=True,
    )
    sequences_2b = batch.input_ids

    want_dict = generation_config.return_dict_in_generate
    scores: tuple[Tensor, ...] | None = () if want_dict and generation_config.output_scores else None
    raw_logits: tuple[Tensor, ...] | None = () if want_dict and generation_config.output_logits else None
    attentions: tuple[Any, ...] | None = () if want_dict and generation_config.output_attentions else None
    hidden_states: tuple[Any, ...] | None = () if want_dict and generation_config.output_hidden_states else None
    has_eos_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    unfinished = torch.ones(rows, dtype=torch.long, device=input_ids.device)
    last_guided_step = max(i for i, scale in enumerate(scales) if scale != 1.0)
    guided = True

    outputs = model._prefill(sequences_2b, generation_config, guided_kwargs)
    step = 0
    while True:
        if step > 0:
            model_inputs = model.prepare_inputs_for_generation(sequences_2b, next_sequence_length=1, **guided_kwargs)
            outputs = model(**model_inputs, return_dict=True)
        guided_kwargs = model._update_model_kwargs_for_generation(outputs, guided_kwargs)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        if bool(torch.isnan(logits).any()):
            raise ValueError(f"The model produced NaN logits at generated token {step}; guidance cannot be applied.")
        cond_logits = logits[:rows]
        scale = scales[step] if step < len(scales) else 1.0
        next_scores = combine(cond_logits, logits[rows:], scale) if guided else cond_logits
        next_scores = logits_processor(input_ids, next_scores)

        if want_dict:
            if scores is not None:
                scores += (next_scores,)
            if raw_logits is not None:
                raw_logits += (cond_logits,)
            if attentions is not None:
                attentions += (_cond_half(outputs.attentions, rows),)
            if hidden_states is not None:
                hidden_states += (_cond_half(outputs.hidden_states, rows),)

        if generation_config.do_sample:
            probs = torch.softmax(next_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_scores, dim=-1)
        if has_eos_criteria and pad_token_id is not None:
            next_tokens = next_tokens * unfinished + pad_value * (1 - unfinished)

        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        appended = torch.cat([next_tokens, next_tokens]) if guided else next_tokens
        sequences_2b = torch.cat([sequences_2b, appended[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        del outputs
        step += 1
        if unfinished.max() == 0:
            break
        if guided and step > last_guided_step:
            guided = False
            _drop_unconditional_rows(guided_kwargs, rows)
            sequences_2b = sequences_2b[:rows]

    if streamer is not None:
        streamer.end()
    if want_dict:
        return GenerateDecoderOnlyOutput(
            sequences=input_ids,
            scores=scores,
            logits=raw_logits,
            attentions=attentions,
            hidden_states=hidden_states,
            past_key_values=None,
        )
    return input_ids


def _drop_unconditional_rows(guided_kwargs: dict[str, Any], rows: int) -> None:
    """Guidance is off for the rest of the sequence: keep only the conditional rows."""
    keep = torch.arange(rows, device=guided_kwargs["attention_mask"].device)
    guided_kwargs["past_key_values"].batch_select_indices(keep)
    for key in ("attention_mask", "position_ids"):
        if guided_kwargs.get(key) is not None:
            guided_kwargs[key] = guided_kwargs[key][:rows]
