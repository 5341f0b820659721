"""Batched classifier-free guidance for transformers ``generate``.

``cfg_generate`` is a ``custom_generate`` callable::

    from guidance import cfg_generate
    out = model.generate(**inputs, guidance_scale=1.5, negative_prompt_ids=neg_ids,
                         negative_prompt_attention_mask=neg_mask, custom_generate=cfg_generate)

transformers' own CFG (``UnbatchedClassifierFreeGuidanceLogitsProcessor``) runs the
unconditional context as a second, sequential forward per token. Here the conditional and
unconditional rows share ONE forward per step (:class:`guidance.lm.two_branch.TwoBranchForward`):
one ``2B`` batch and one KV cache, with left padding, attention masks and position ids that
keep every row's positions right. When the guidance schedule is off (scale 1) for all
remaining tokens, the unconditional rows leave the batch and the cache.

The decoding loops (here for greedy search and sampling, :mod:`guidance.lm.beams` for beam
search) call only the model's public ``forward``, the ``DynamicCache`` API, the generation
config's logits processors and stopping criteria, and return transformers' public output
classes. With guidance off, ``generate``'s own decoding runs instead
(:func:`guidance.lm.compat.run_transformers_decoding`), so the output is transformers' bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import LongTensor, Tensor
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from transformers.generation.logits_process import TypicalLogitsWarper

from guidance import ops
from guidance.lm import compat
from guidance.lm.adaptive import AdaptiveForward, AdaptiveLMGuidance, as_adaptive
from guidance.lm.batching import build_guided_batch, expand_negative_prompt
from guidance.lm.beams import cfg_beam_search
from guidance.lm.sampling import GeneratorSampling, sample_with_generator
from guidance.lm.two_branch import OutputRecord, TwoBranchForward
from guidance.schedules import Constant, Schedule, as_schedule
from guidance.validation import check_bool, check_choice, check_finite

__all__ = ["cfg_generate", "CFG_FORMS"]

CFG_FORMS = ("log_probs", "logits")
_MODES = {"greedy_search": "greedy", "sample": "sample", "beam_search": "beam", "beam_sample": "beam"}
# Keyword arguments generate prepares for the model that the two-branch batch rebuilds itself.
_REBUILT = ("attention_mask", "position_ids", "cache", "past_key_values", "cache_position", "use_cache")


@torch.no_grad()
def cfg_generate(
    model: Any,
    input_ids: LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    guidance_schedule: Schedule | Callable[..., float] | float | None = None,
    cfg_form: str = "log_probs",
    cfg_negative_prompt_ids: Tensor | None = None,
    cfg_negative_prompt_attention_mask: Tensor | None = None,
    cfg_streamer: Any = None,
    generator: torch.Generator | None = None,
    cfg_fused_sampling: bool | None = None,
    guidance_adaptive: AdaptiveLMGuidance | float | None = None,
    **model_kwargs: Any,
) -> GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput | LongTensor:
    """Classifier-free guidance decoding with one batched forward per token.

    Pass it to ``generate`` as ``custom_generate=cfg_generate``; every usual ``generate``
    argument keeps its meaning, except ``streamer`` (see ``cfg_streamer``). Guidance settings:

    - ``guidance_scale`` (generation config; `float`, finite): ``w`` in ``u + w (c - u)``;
      1 is off, ``0 < w < 1`` with a negative prompt moves towards it.
    - ``negative_prompt_ids`` / ``negative_prompt_attention_mask`` (`LongTensor` of shape
      ``(1 | batch | batch * num_return_sequences, length)``, left-padded): the unconditional
      context. Default: the last prompt token (Sanchez et al., transformers). transformers
      hands them to ``cfg_generate`` only together with a ``guidance_scale`` other than 1.
    - ``guidance_schedule``: a :mod:`guidance.schedules` schedule (or a callable
      ``(step, num_steps) -> scale``) over generated tokens, instead of ``guidance_scale``;
      ``num_steps`` is ``max_new_tokens``.
    - ``cfg_form`` (`str`): ``"log_probs"`` (default; transformers' numbers) or ``"logits"``.
    - ``cfg_negative_prompt_ids`` / ``cfg_negative_prompt_attention_mask``: the same as
      ``negative_prompt_ids``, but they always reach ``cfg_generate`` (needed with a
      ``guidance_schedule``: transformers drops ``negative_prompt_ids`` when ``guidance_scale``
      is unset or 1). Passing both forms raises.
    - ``cfg_streamer``: a streamer (``put``/``end``, e.g. ``TextIteratorStreamer``).
      transformers does not pass ``streamer=`` to a callable ``custom_generate`` (the streamer
      would receive the prompt and never end), so use this argument instead.
    - ``generator``: a ``torch.Generator`` to sample from instead of torch's global one
      (greedy search and sampling; see :mod:`guidance.lm.sampling`).
    - ``cfg_fused_sampling`` (`bool`, *optional*): draw each guided token with the fused
      combine + temperature + typical + draw step (:class:`samplers.kernels.FusedSampling`)
      instead of the processors and ``torch.multinomial``. ``None`` (default): when sampling
      on CUDA with Triton and the rules below allow it; ``True``: on any device, and
      ``ValueError`` when the rules do not allow it; ``False``: never. Rules: sampling (not
      greedy, not beams), every processor after the CFG combine is a temperature warper
      followed by at most one typical warper (transformers adds ``top_k=50`` unless you pass
      ``top_k=0`` or ``top_k=None``), no ``output_scores`` (the fused step computes no scores;
      ``output_logits`` are fine). No effect with guidance off.

    Seeds with fused sampling: each token costs one float64 uniform per row, drawn from
    ``generator`` when given, else from torch's global generator (advanced, never reseeded,
    as ``torch.multinomial`` would advance it). The same seed gives the same tokens on the
    same device and kernel (Triton on CUDA, PyTorch elsewhere), but not the tokens that
    ``torch.multinomial`` draws for that seed; the distribution is the same (the typical set
    is decided exactly, see :mod:`samplers.typical`).
    - ``guidance_adaptive``: ``None`` (default, off) or a threshold (`float` in ``[0, inf]``) or
      an :class:`~guidance.lm.adaptive.AdaptiveLMGuidance`: compute the unconditional logits
      only for the rows and tokens where they can change the choice (greedy search and sampling;
      see :mod:`guidance.lm.adaptive`). With ``return_dict_in_generate=True`` the output is an
      ``AdaptiveGenerateOutput`` whose ``adaptive_stats`` counts, per row, the unconditional
      positions computed (``unconditional_positions``) and what batched CFG would compute.

    Supported: greedy search, sampling, beam search and beam sampling (``num_beams``,
    ``num_return_sequences``, ``length_penalty``, ``early_stopping``; both branches' caches
    reordered each step), batches, the generation config's processors, warpers and stopping
    criteria, ``return_dict_in_generate`` with ``output_scores``/``output_logits`` (the
    conditional rows' raw logits), attentions and hidden states (conditional rows). While
    guiding, ``typical_p`` uses the exact, sort-free :class:`samplers.LocallyTypicalWarper`.
    Not supported (``ValueError``): encoder-decoder models, ``inputs_embeds``, assisted, DoLa,
    contrastive, group and constrained beam search, a non-empty initial cache, ``synced_gpus``.
    With guidance off (scale 1 and no schedule, or a schedule that is 1 everywhere) this is
    exactly transformers' own decoding.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from guidance import cfg_generate
        >>> _ = torch.manual_seed(0)
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()
        >>> prompt = torch.tensor([[3, 5, 7]])
        >>> out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), guidance_scale=1.5,
        ...                   max_new_tokens=4, custom_generate=cfg_generate)
        >>> out.shape
        torch.Size([1, 7])
    """
    streamer = _pick_streamer(model_kwargs.pop("streamer", None), cfg_streamer)
    mode = _validate(model, generation_config, model_kwargs, cfg_form, streamer)
    adaptive = as_adaptive(guidance_adaptive)
    if adaptive is not None and mode == "beam":
        raise ValueError(
            "`guidance_adaptive` supports greedy search and sampling, not beam search (num_beams > 1)."
        )
    logits_processor, scale, negative_ids, negative_mask = _take_transformers_cfg(logits_processor)
    if generator is not None and mode == "beam":
        raise ValueError("`generator` is supported with greedy search and sampling, not with beam search.")
    logits_processor, generation_config = sample_with_generator(
        generator, logits_processor, generation_config
    )
    if cfg_fused_sampling is not None:
        check_bool(cfg_fused_sampling, "cfg_fused_sampling")
    if cfg_negative_prompt_ids is not None:
        if negative_ids is not None:
            raise ValueError("Pass either `negative_prompt_ids` or `cfg_negative_prompt_ids`, not both.")
        negative_ids, negative_mask = cfg_negative_prompt_ids, cfg_negative_prompt_attention_mask
    scales = _scales(
        _schedule(scale, guidance_schedule), int(generation_config.max_length) - input_ids.shape[1]
    )
    guided = any(value != 1.0 for value in scales)
    if guided:  # builds (and validates) the two-branch batch before any output
        forward = _two_branch_forward(
            model, input_ids, generation_config, negative_ids, negative_mask, model_kwargs, adaptive, cfg_form
        )
        draw = _fused_draw(forward, logits_processor, generation_config, cfg_fused_sampling, input_ids.device)
    if cfg_streamer is not None:
        cfg_streamer.put(input_ids.cpu())  # what generate does for its own `streamer`
    if not guided:
        return compat.run_transformers_decoding(
            model,
            mode,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            streamer,
            **model_kwargs,
        )
    processors = _use_sort_free_typical(logits_processor)
    combine = _combine_fn(cfg_form)
    if mode == "beam":
        return cfg_beam_search(
            forward, input_ids, processors, stopping_criteria, generation_config, scales, combine
        )
    output = _guided_sample(
        forward, input_ids, processors, stopping_criteria, generation_config, streamer, scales, combine, draw
    )
    return output if adaptive is None else forward.output(output)


def _combine_fn(cfg_form: str) -> Callable[[Tensor, Tensor, float], Tensor]:
    if cfg_form == "logits":
        return ops.cfg_logits
    from samplers.kernels import cfg_log_softmax  # fused Triton kernel on CUDA, ops.cfg_log_probs elsewhere

    return cfg_log_softmax


def _pick_streamer(passed: Any, cfg_streamer: Any) -> Any:
    if passed is not None and cfg_streamer is not None:
        raise ValueError("Pass either `streamer` or `cfg_streamer`, not both.")
    return cfg_streamer if cfg_streamer is not None else passed


def _take_transformers_cfg(
    logits_processor: LogitsProcessorList,
) -> tuple[LogitsProcessorList, float | None, Tensor | None, Tensor | None]:
    """Remove transformers' sequential CFG processor; return its scale and unconditional context."""
    kept = LogitsProcessorList()
    scale = negative_ids = negative_mask = None
    for processor in logits_processor:
        settings = compat.transformers_cfg_settings(processor)
        if settings is None:
            kept.append(processor)
        else:
            scale, negative_ids, negative_mask = settings
    return kept, scale, negative_ids, negative_mask


def _use_sort_free_typical(logits_processor: LogitsProcessorList) -> LogitsProcessorList:
    """Swap transformers' sort-based typical warper for the exact, sort-free one (same semantics).

    It keeps the same tokens except where transformers' float32 running sum decides the boundary
    token wrongly (see :mod:`samplers.typical`); only used while guiding, so that guidance off
    stays bit-identical to plain ``generate``.
    """
    from samplers.typical import LocallyTypicalWarper

    return LogitsProcessorList(
        LocallyTypicalWarper(p.mass, p.min_tokens_to_keep, p.filter_value)
        if type(p) is TypicalLogitsWarper
        else p
        for p in logits_processor
    )


def _validate(
    model: Any,
    generation_config: GenerationConfig,
    model_kwargs: dict[str, Any],
    cfg_form: str,
    streamer: Any,
) -> str:
    """Reject what cfg_generate cannot do, before any work; return the decoding mode."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            "cfg_generate supports decoder-only (causal) language models; this model is encoder-decoder. "
            "Use transformers' `guidance_scale` for it."
        )
    mode = _MODES.get(generation_config.get_generation_mode().value)
    if mode is None:
        raise ValueError(
            "cfg_generate supports greedy search, sampling, beam search and beam sampling; got generation mode "
            f"{generation_config.get_generation_mode().value!r} (assisted, DoLa, contrastive, group and "
            "constrained beam search are not supported)."
        )
    if mode == "beam" and streamer is not None:
        raise ValueError("Streamers are not supported with beam search (num_beams > 1), as in transformers.")
    check_choice(cfg_form, "cfg_form", CFG_FORMS)
    if model_kwargs.pop("synced_gpus", False):
        raise ValueError("cfg_generate does not support `synced_gpus`.")
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("cfg_generate needs `input_ids`; `inputs_embeds` is not supported.")
    for key in ("cache", "past_key_values"):
        cache = model_kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise ValueError(
                f"cfg_generate starts from an empty cache; the `{key}` passed already holds tokens."
            )
    return mode


def _schedule(scale: float | None, guidance_schedule: Any) -> Schedule:
    if guidance_schedule is not None:
        if scale is not None:
            raise ValueError("Pass either `guidance_scale` or `guidance_schedule`, not both.")
        return as_schedule(guidance_schedule)
    scale = 1.0 if scale is None else scale
    ops.validate_scale(scale, "guidance_scale")
    return Constant(scale)


def _scales(schedule: Schedule, num_steps: int) -> list[float]:
    return [check_finite(schedule(step, num_steps, None), f"guidance_schedule({step})") for step in range(max(num_steps, 0))]


def _pad_value(generation_config: GenerationConfig) -> int | None:
    """The token appended to finished rows: ``pad_token_id``, else the first ``eos_token_id`` (as generate)."""
    for value in (generation_config.pad_token_id, generation_config.eos_token_id):
        if isinstance(value, Tensor):
            value = value.reshape(-1).tolist()
        if isinstance(value, Sequence):
            value = value[0] if len(value) else None
        if value is not None:
            return int(value)
    return None


def _two_branch_forward(
    model: Any,
    input_ids: LongTensor,
    generation_config: GenerationConfig,
    negative_ids: Tensor | None,
    negative_mask: Tensor | None,
    model_kwargs: dict[str, Any],
    adaptive: AdaptiveLMGuidance | None = None,
    cfg_form: str = "log_probs",
) -> TwoBranchForward | AdaptiveForward:
    rows = input_ids.shape[0]
    if negative_ids is not None:
        num_prompts = _num_prompts(rows, generation_config)
        negative_ids, negative_mask = expand_negative_prompt(
            negative_ids.to(input_ids.device),
            None if negative_mask is None else negative_mask.to(input_ids.device),
            num_prompts,
            rows // num_prompts,
        )
    pad = _pad_value(generation_config)
    batch = build_guided_batch(
        input_ids, model_kwargs.get("attention_mask"), negative_ids, negative_mask, 0 if pad is None else pad
    )
    extra = {k: v for k, v in model_kwargs.items() if k not in _REBUILT and v is not None}
    for key, value in extra.items():
        if isinstance(value, Tensor):
            raise ValueError(
                f"cfg_generate cannot batch the model input `{key}`; only `input_ids` and "
                "`attention_mask` are supported."
            )
    if generation_config.output_attentions:
        extra["output_attentions"] = True
    if generation_config.output_hidden_states:
        extra["output_hidden_states"] = True
    if adaptive is not None:
        return AdaptiveForward(model, batch, extra, adaptive, cfg_form)
    return TwoBranchForward(model, batch, extra)


def _num_prompts(rows: int, generation_config: GenerationConfig) -> int:
    expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
    return rows // expand


def _guided_sample(
    forward: TwoBranchForward,
    input_ids: LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    streamer: Any,
    scales: list[float],
    combine: Callable[[Tensor, Tensor, float], Tensor],
    draw: Callable[[Tensor, Tensor | None, float], Tensor] | None = None,
) -> GenerateDecoderOnlyOutput | LongTensor:
    """Greedy search or sampling on guided scores (the loop of transformers' ``_sample``, on our forward)."""
    record = OutputRecord(forward, generation_config)
    pad = _pad_value(generation_config)
    finishes_rows = pad is not None and any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    last_guided = max(i for i, scale in enumerate(scales) if scale != 1.0)
    for step in range(len(scales) + 1):
        outputs = forward()
        tokens, scores, cond_logits = _next_tokens(
            forward,
            outputs,
            input_ids,
            logits_processor,
            generation_config,
            scales[min(step, len(scales) - 1)],
            combine,
            step,
            draw,
        )
        record.add(outputs, scores, cond_logits)
        del outputs
        if finishes_rows:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, record.scores)
        if unfinished.max() == 0:
            break
        if step >= last_guided:
            forward.drop_unconditional()
        if finishes_rows:
            forward.mark_unfinished(unfinished)  # adaptive guidance skips finished rows
        forward.append(tokens)
    if streamer is not None:
        streamer.end()
    if not record.want_dict:
        return input_ids
    return GenerateDecoderOnlyOutput(
        sequences=input_ids,
        scores=record.scores,
        logits=record.logits,
        attentions=record.attentions,
        hidden_states=record.hidden_states,
    )


def _next_tokens(
    forward: TwoBranchForward,
    outputs: Any,
    input_ids: LongTensor,
    logits_processor: LogitsProcessorList,
    generation_config: GenerationConfig,
    scale: float,
    combine: Callable[[Tensor, Tensor, float], Tensor],
    step: int,
    draw: Callable[[Tensor, Tensor | None, float], Tensor] | None,
) -> tuple[LongTensor, Tensor | None, Tensor]:
    """``(tokens, processed scores or None, conditional logits)`` of one step of the sampling loop."""
    if draw is not None:  # fused combine + warpers + draw: no scores
        cond, uncond = forward.next_logits(outputs, step)
        return draw(cond, uncond, scale), None, cond
    scores, cond = forward.next_scores(outputs, scale, combine, step)
    scores = logits_processor(input_ids, scores)
    if generation_config.do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1), scores, cond
    return torch.argmax(scores, dim=-1), scores, cond


def _fused_draw(
    forward: Any,
    processors: LogitsProcessorList,
    generation_config: GenerationConfig,
    requested: bool | None,
    device: torch.device,
) -> Callable[[Tensor, Tensor | None, float], Tensor] | None:
    """The fused draw for the guided sampling loop, or None to keep processors + ``torch.multinomial``.

    A trailing :class:`GeneratorSampling` (the user's ``generator=``) is taken apart: the fused
    step draws its uniforms from that generator instead. Both CFG forms fuse: they differ by a
    constant per row, which temperature and the typical filter do not see.
    """
    if requested is False:
        return None
    from samplers.kernels import fused_warpers_supported, uses_triton

    generator = None
    if processors and isinstance(processors[-1], GeneratorSampling):
        generator, processors = processors[-1].generator, processors[:-1]
    sampling = generation_config.do_sample or generator is not None
    fused = fused_warpers_supported(processors) if sampling else None
    why = None
    if not sampling or generation_config.get_generation_mode().value.startswith("beam"):
        why = "it applies to sampling only (do_sample=True, num_beams=1)"
    elif fused is None:
        names = ", ".join(type(p).__name__ for p in processors)
        why = f"it fuses a temperature warper then at most one typical warper, got [{names}] (pass top_k=0?)"
    elif generation_config.return_dict_in_generate and generation_config.output_scores:
        why = "the fused step computes no scores for output_scores"
    elif not isinstance(forward, TwoBranchForward):
        why = f"it needs both branches' logits at every step, which {type(forward).__name__} does not give"
    if why is not None:
        if requested:
            raise ValueError(f"`cfg_fused_sampling=True` cannot be honoured: {why}.")
        return None
    if requested is None and not uses_triton(
        torch.empty((1, 1), device=device)
    ):  # CPU: see benchmarks/fused_step.py
        return None
    return functools.partial(fused.sample, generator=generator)
