"""Beam search with CFG against a slow reference: transformers' own beam search on a model whose
logits ARE the CFG combine of two full, uncached forwards (conditional and unconditional) per beam."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from guidance import cfg_generate, ops
from guidance.schedules import Window

PROMPTS = [[5, 17, 33, 8, 41, 12], [7, 3, 50]]
NEGATIVES = [[9, 27, 4], [11]]


def _left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _last_logits(base, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1].float()


def cfg_reference(base, prompt_mask, negative_ids, negative_mask, scale_at, num_beams, form="log_probs"):
    """``base`` with a forward that returns the CFG combine of full cond and uncond forwards (no cache).

    Row ``r`` of the beam batch belongs to prompt ``r // num_beams``; its unconditional context is that
    prompt's negative prompt (or its last token) followed by the tokens the beam generated.
    """
    prompt_len = prompt_mask.shape[1]
    combine = ops.cfg_log_probs if form == "log_probs" else ops.cfg_logits

    def forward(self, input_ids, attention_mask=None, **kwargs):
        rows = input_ids.shape[0]
        generated = input_ids[:, prompt_len:]
        prompt_rows = prompt_mask.repeat_interleave(rows // prompt_mask.shape[0], dim=0)
        cond_mask = torch.cat([prompt_rows, torch.ones_like(generated)], dim=1)
        if negative_ids is None:
            neg_ids, neg_mask = input_ids[:, prompt_len - 1 : prompt_len], torch.ones(rows, 1, dtype=torch.long)
        else:
            expand = rows // negative_ids.shape[0]
            neg_ids = negative_ids.repeat_interleave(expand, dim=0)
            neg_mask = negative_mask.repeat_interleave(expand, dim=0)
        uncond_ids = torch.cat([neg_ids, generated], dim=1)
        uncond_mask = torch.cat([neg_mask, torch.ones_like(generated)], dim=1)
        cond = _last_logits(base, input_ids, cond_mask)
        uncond = _last_logits(base, uncond_ids, uncond_mask)
        guided = combine(cond, uncond, scale_at(generated.shape[1]))
        return CausalLMOutputWithPast(logits=guided[:, None, :])

    reference = copy.copy(base)  # shares every module and weight with base
    reference.__class__ = type("CFGReference", (type(base),), {"forward": forward})
    return reference


def _beam_kwargs(**overrides):
    kwargs = dict(max_new_tokens=10, return_dict_in_generate=True, output_scores=True, do_sample=False)
    kwargs.update(overrides)
    return kwargs


def _assert_same_beams(ours, reference, atol=2e-5):
    assert torch.equal(ours.sequences, reference.sequences)
    assert torch.equal(ours.beam_indices, reference.beam_indices)
    torch.testing.assert_close(ours.sequences_scores, reference.sequences_scores, atol=atol, rtol=1e-5)
    assert len(ours.scores) == len(reference.scores)
    for a, b in zip(ours.scores, reference.scores, strict=True):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a))
        torch.testing.assert_close(a[finite], b[finite], atol=atol, rtol=1e-5)


def _frequent_token(tiny_lm, ids, **kwargs):
    """A token the best guided beam produces third, to serve as EOS so that hypotheses finish early."""
    out = tiny_lm.generate(input_ids=ids, custom_generate=cfg_generate, **kwargs)
    return int(out.sequences[0, ids.shape[1] + 2])


@pytest.mark.parametrize(
    ("num_beams", "num_return", "length_penalty", "early_stopping", "negative", "form"),
    [
        (2, 1, 1.0, False, False, "log_probs"),
        (3, 2, 2.0, True, True, "log_probs"),
        (4, 3, -1.0, "never", True, "log_probs"),
        (3, 3, 0.5, "never", False, "logits"),
    ],
)
def test_beam_search_matches_uncached_reference(tiny_lm, num_beams, num_return, length_penalty, early_stopping,
                                                negative, form):
    ids, mask = _left_pad(PROMPTS)
    neg_ids, neg_mask = _left_pad(NEGATIVES) if negative else (None, None)
    scale = 2.5
    kwargs = _beam_kwargs(num_beams=num_beams, num_return_sequences=num_return, length_penalty=length_penalty,
                          early_stopping=early_stopping)
    guided = dict(attention_mask=mask, guidance_scale=scale, cfg_form=form, cfg_negative_prompt_ids=neg_ids,
                  cfg_negative_prompt_attention_mask=neg_mask)
    eos = _frequent_token(tiny_lm, ids, **guided, **kwargs)
    kwargs["eos_token_id"] = eos
    ours = tiny_lm.generate(input_ids=ids, custom_generate=cfg_generate, **guided, **kwargs)
    reference_model = cfg_reference(tiny_lm, mask, neg_ids, neg_mask, lambda step: scale, num_beams, form)
    reference = reference_model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    _assert_same_beams(ours, reference)
    assert ours.sequences.shape[0] == len(PROMPTS) * num_return
    if length_penalty <= 1.0:  # (a penalty > 1 favours the long hypotheses here)
        assert bool((ours.sequences[:, ids.shape[1] :] == eos).any()), "no hypothesis ended in EOS"
        assert bool((ours.beam_indices == -1).any()), "no returned hypothesis finished before the others"


def test_beam_search_with_transformers_negative_prompt_arguments(tiny_lm):
    """transformers' own CFG crashes on num_beams=2 with a negative prompt; ours runs it, on its public arguments."""
    ids, mask = torch.tensor([PROMPTS[0]]), torch.ones(1, len(PROMPTS[0]), dtype=torch.long)
    negative = torch.tensor([NEGATIVES[0]])
    kwargs = _beam_kwargs(num_beams=2)
    ours = tiny_lm.generate(input_ids=ids, attention_mask=mask, guidance_scale=3.0, negative_prompt_ids=negative,
                            custom_generate=cfg_generate, **kwargs)
    reference = cfg_reference(tiny_lm, mask, negative, torch.ones_like(negative), lambda step: 3.0, 2).generate(
        input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    _assert_same_beams(ours, reference)


def test_schedule_ending_mid_search_drops_the_unconditional_rows(tiny_lm):
    ids, mask = _left_pad(PROMPTS)
    window = Window(scale=3.0, start_step=0, end_step=3)
    batch_sizes: list[int] = []
    hook = tiny_lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    kwargs = _beam_kwargs(num_beams=3, num_return_sequences=2, max_new_tokens=8)
    try:
        ours = tiny_lm.generate(input_ids=ids, attention_mask=mask, guidance_schedule=window,
                                custom_generate=cfg_generate, **kwargs)
    finally:
        hook.remove()
    rows = len(PROMPTS) * 3
    assert batch_sizes == [2 * rows] * 3 + [rows] * 5
    reference_model = cfg_reference(tiny_lm, mask, None, None, lambda step: window(step, 8, None), 3)
    reference = reference_model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    _assert_same_beams(ours, reference)


@pytest.mark.parametrize("schedule", [None, lambda step, num_steps: 1.0])
def test_scale_one_is_bit_identical_to_plain_beam_search(tiny_lm, schedule):
    ids, mask = _left_pad(PROMPTS)
    kwargs = _beam_kwargs(num_beams=3, num_return_sequences=2, output_logits=True, length_penalty=1.5)
    plain = tiny_lm.generate(input_ids=ids, attention_mask=mask, **kwargs)
    guidance = {"guidance_scale": 1.0} if schedule is None else {"guidance_schedule": schedule}
    ours = tiny_lm.generate(input_ids=ids, attention_mask=mask, custom_generate=cfg_generate, **guidance, **kwargs)
    assert torch.equal(plain.sequences, ours.sequences)
    assert torch.equal(plain.sequences_scores, ours.sequences_scores)
    assert torch.equal(plain.beam_indices, ours.beam_indices)
    for name in ("scores", "logits"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(plain, name), getattr(ours, name), strict=True))


def test_beam_sampling_is_seeded_and_guided(tiny_lm):
    ids, mask = _left_pad(PROMPTS)
    kwargs = dict(num_beams=3, do_sample=True, max_new_tokens=10, top_k=20, custom_generate=cfg_generate)
    torch.manual_seed(4)
    first = tiny_lm.generate(input_ids=ids, attention_mask=mask, guidance_scale=3.0, **kwargs)
    torch.manual_seed(4)
    second = tiny_lm.generate(input_ids=ids, attention_mask=mask, guidance_scale=3.0, **kwargs)
    assert torch.equal(first, second)
    torch.manual_seed(4)
    unguided = tiny_lm.generate(input_ids=ids, attention_mask=mask, guidance_scale=1.0, **kwargs)
    assert not torch.equal(first, unguided)


def test_beam_search_rejects_a_streamer(tiny_lm):
    class Streamer:
        def put(self, value):
            pass

        def end(self):
            pass

    with pytest.raises(ValueError, match="beam search"):
        tiny_lm.generate(input_ids=torch.tensor([PROMPTS[0]]), guidance_scale=2.0, num_beams=2, max_new_tokens=3,
                         cfg_streamer=Streamer(), custom_generate=cfg_generate)


@pytest.mark.slow
def test_embedded_model_beam_search_matches_uncached_reference(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer(["The capital of France is", "Once upon a time, a little dragon"], return_tensors="pt",
                       padding=True)
    negative = tokenizer(["Write about cats."], return_tensors="pt")
    kwargs = _beam_kwargs(num_beams=3, num_return_sequences=2, max_new_tokens=8, length_penalty=1.2,
                          early_stopping=True, pad_token_id=tokenizer.pad_token_id)
    ours = model.generate(**inputs, guidance_scale=2.0, negative_prompt_ids=negative.input_ids,
                          negative_prompt_attention_mask=negative.attention_mask, custom_generate=cfg_generate,
                          **kwargs)
    reference_model = cfg_reference(model, inputs.attention_mask, negative.input_ids, negative.attention_mask,
                                    lambda step: 2.0, 3)
    reference = reference_model.generate(**inputs, use_cache=False, **kwargs)
    _assert_same_beams(ours, reference, atol=1e-4)
