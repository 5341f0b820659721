"""Batched CFG decoding (`cfg_generate`) against transformers' own generate and CFG."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from guidance import cfg_generate
from guidance.lm import CFGLogitsProcessor, ModelUnconditionalLogits
from guidance.schedules import Linear, Window

PROMPT = torch.tensor([[5, 17, 33, 8, 41, 12]])
NEGATIVE = torch.tensor([[9, 27, 4]])


def _gen(model, ids, mask=None, **kwargs):
    torch.manual_seed(kwargs.pop("seed", 0))
    if mask is None:
        mask = torch.ones_like(ids)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=kwargs.pop("max_new_tokens", 12), **kwargs)


@pytest.mark.parametrize("sampling", [False, True])
def test_scale_one_is_bit_identical_to_plain_generate(tiny_lm, sampling):
    kwargs = dict(do_sample=sampling, return_dict_in_generate=True, output_scores=True, output_logits=True)
    if sampling:
        kwargs.update(top_k=20, temperature=0.8)
    plain = _gen(tiny_lm, PROMPT, **kwargs)
    ours = _gen(tiny_lm, PROMPT, guidance_scale=1.0, custom_generate=cfg_generate, **kwargs)
    assert torch.equal(plain.sequences, ours.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, ours.scores, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, ours.logits, strict=True))


@pytest.mark.parametrize("scale", [0.5, 1.5, 3.0])
@pytest.mark.parametrize("negative", [False, True])
def test_matches_transformers_cfg(tiny_lm, scale, negative):
    kwargs = dict(guidance_scale=scale, return_dict_in_generate=True, output_scores=True)
    if negative:
        kwargs.update(negative_prompt_ids=NEGATIVE, negative_prompt_attention_mask=torch.ones_like(NEGATIVE))
    reference = _gen(tiny_lm, PROMPT, **kwargs)
    ours = _gen(tiny_lm, PROMPT, custom_generate=cfg_generate, **kwargs)
    assert torch.equal(reference.sequences, ours.sequences)
    for ref_scores, our_scores in zip(reference.scores, ours.scores, strict=True):
        torch.testing.assert_close(our_scores, ref_scores, atol=2e-5, rtol=1e-5)


def test_processors_apply_after_guidance_like_transformers(tiny_lm):
    kwargs = dict(guidance_scale=2.0, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5)
    assert torch.equal(_gen(tiny_lm, PROMPT, **kwargs), _gen(tiny_lm, PROMPT, custom_generate=cfg_generate, **kwargs))


def test_padded_batch_rows_equal_single_rows(tiny_lm):
    """Left padding, masks and position ids: each row of a padded batch decodes as it does alone."""
    prompts = [[5, 17, 33, 8, 41, 12], [7, 3, 50], [60, 61, 62, 63]]
    negatives = [[9, 27, 4], [11], [30, 31, 32, 33, 34, 35, 36]]

    def left_pad(rows):
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return ids, mask

    ids, mask = left_pad(prompts)
    neg_ids, neg_mask = left_pad(negatives)
    batched = _gen(
        tiny_lm, ids, mask, guidance_scale=2.5, negative_prompt_ids=neg_ids,
        negative_prompt_attention_mask=neg_mask, custom_generate=cfg_generate,
    )
    for row, (prompt, negative) in enumerate(zip(prompts, negatives, strict=True)):
        single = _gen(
            tiny_lm, torch.tensor([prompt]), guidance_scale=2.5,
            negative_prompt_ids=torch.tensor([negative]), custom_generate=cfg_generate,
        )
        assert batched[row, -12:].tolist() == single[0, -12:].tolist()


def test_one_negative_prompt_for_all_rows_and_num_return_sequences(tiny_lm):
    ids = torch.tensor([[5, 17, 33], [7, 3, 50]])
    out = _gen(
        tiny_lm, ids, guidance_scale=2.0, negative_prompt_ids=NEGATIVE, num_return_sequences=3,
        do_sample=True, custom_generate=cfg_generate,
    )
    assert out.shape == (6, 3 + 12)
    assert torch.equal(out[:3, :3], ids[:1].expand(3, -1)) and torch.equal(out[3:, :3], ids[1:].expand(3, -1))
    per_prompt = torch.tensor([[9, 27, 4], [0, 11, 12]])
    out = _gen(
        tiny_lm, ids, guidance_scale=2.0, negative_prompt_ids=per_prompt,
        negative_prompt_attention_mask=(per_prompt != 0).long(), num_return_sequences=2, do_sample=True,
        custom_generate=cfg_generate,
    )
    assert out.shape == (4, 3 + 12)


def test_sampling_is_reproducible_and_guidance_changes_it(tiny_lm):
    kwargs = dict(do_sample=True, guidance_scale=3.0, custom_generate=cfg_generate, max_new_tokens=16)
    first, second = _gen(tiny_lm, PROMPT, seed=3, **kwargs), _gen(tiny_lm, PROMPT, seed=3, **kwargs)
    assert torch.equal(first, second)
    unguided = _gen(tiny_lm, PROMPT, seed=3, do_sample=True, max_new_tokens=16)
    assert not torch.equal(first, unguided)


def test_streamer_receives_every_generated_token(tiny_lm):
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    out = _gen(tiny_lm, PROMPT, guidance_scale=2.0, cfg_streamer=streamer, custom_generate=cfg_generate)
    assert streamer.ended
    assert streamer.chunks[0] == PROMPT[0].tolist()
    assert [token for chunk in streamer.chunks[1:] for token in chunk] == out[0, PROMPT.shape[1]:].tolist()


def test_eos_and_stopping_criteria(tiny_lm):
    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= PROMPT.shape[1] + 4, dtype=torch.bool)

    out = _gen(tiny_lm, PROMPT, guidance_scale=2.0, stopping_criteria=StoppingCriteriaList([StopAfter()]),
               custom_generate=cfg_generate)
    assert out.shape[1] == PROMPT.shape[1] + 4
    guided = _gen(tiny_lm, PROMPT, guidance_scale=2.0, custom_generate=cfg_generate)
    eos = int(guided[0, PROMPT.shape[1] + 2])  # make the third generated token an EOS
    stopped = _gen(tiny_lm, PROMPT, guidance_scale=2.0, eos_token_id=eos, custom_generate=cfg_generate)
    assert stopped.shape[1] == PROMPT.shape[1] + 3 and int(stopped[0, -1]) == eos


def test_schedule_window_turns_guidance_off_and_drops_unconditional_rows(tiny_lm):
    window = Window(scale=3.0, start_step=0, end_step=4)
    batch_sizes: list[int] = []
    hook = tiny_lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        ours = _gen(tiny_lm, PROMPT, guidance_schedule=window, custom_generate=cfg_generate,
                    return_dict_in_generate=True, output_scores=True)
    finally:
        hook.remove()
    # Prefill and steps 1-3 carry both branches; from step 4 (guidance off) only the prompt rows run.
    assert batch_sizes == [2] * 4 + [1] * 8
    # Independent path: the processor form with the same model as unconditional source.
    reference_processor = CFGLogitsProcessor(1.0, ModelUnconditionalLogits(tiny_lm), guidance_schedule=window)
    reference = _gen(tiny_lm, PROMPT, logits_processor=LogitsProcessorList([reference_processor]),
                     return_dict_in_generate=True, output_scores=True)
    assert torch.equal(ours.sequences, reference.sequences)
    for step, (a, b) in enumerate(zip(ours.scores, reference.scores, strict=True)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        if step >= 4:  # guidance off: raw conditional logits, as plain decoding (not normalised)
            assert bool((a.exp().sum(-1) - 1).abs().max() > 1e-3)
    # Inside the window the tokens are those of constant guidance at the same scale.
    constant = _gen(tiny_lm, PROMPT, guidance_scale=3.0, custom_generate=cfg_generate)
    start = PROMPT.shape[1]
    assert ours.sequences[0, start : start + 4].tolist() == constant[0, start : start + 4].tolist()


def test_linear_schedule_matches_processor_form(tiny_lm):
    ramp = Linear(1.0, 4.0)
    ours = _gen(tiny_lm, PROMPT, guidance_schedule=ramp, custom_generate=cfg_generate)
    processor = CFGLogitsProcessor(1.0, ModelUnconditionalLogits(tiny_lm), guidance_schedule=ramp, num_steps=12)
    assert torch.equal(ours, _gen(tiny_lm, PROMPT, logits_processor=LogitsProcessorList([processor])))


def test_processor_form_matches_transformers_cfg(tiny_lm):
    processor = CFGLogitsProcessor(
        2.0, ModelUnconditionalLogits(tiny_lm, context_ids=NEGATIVE, context_attention_mask=torch.ones_like(NEGATIVE))
    )
    ours = _gen(tiny_lm, PROMPT, logits_processor=LogitsProcessorList([processor]))
    reference = _gen(tiny_lm, PROMPT, guidance_scale=2.0, negative_prompt_ids=NEGATIVE)
    assert torch.equal(ours, reference)


def test_raw_logit_form_differs_only_by_row_constants(tiny_lm):
    kwargs = dict(guidance_scale=2.0, return_dict_in_generate=True, output_scores=True, custom_generate=cfg_generate)
    log_probs = _gen(tiny_lm, PROMPT, **kwargs)
    logits = _gen(tiny_lm, PROMPT, cfg_form="logits", **kwargs)
    assert torch.equal(log_probs.sequences, logits.sequences)
    first = log_probs.scores[0] - logits.scores[0]
    torch.testing.assert_close(first, first[:, :1].expand_as(first), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(guidance_scale=2.0, negative_prompt_ids=torch.ones(3, 2, dtype=torch.long)), "negative_prompt_ids"),
        (dict(guidance_scale=2.0, prompt_lookup_num_tokens=2), "assisted"),
        (dict(guidance_scale=2.0, guidance_schedule=Linear(1, 2)), "either"),
        (dict(guidance_schedule=lambda step: float("inf")), "finite"),
        (dict(guidance_scale=2.0, cfg_form="probs"), "cfg_form"),
        (dict(guidance_scale=2.0, negative_prompt_ids=torch.ones(1, 0, dtype=torch.long)), "empty"),
    ],
)
def test_bad_input_is_rejected_before_decoding(tiny_lm, kwargs, message):
    ids = torch.tensor([[5, 17, 33], [7, 3, 50]])
    with pytest.raises(ValueError, match=message):
        _gen(tiny_lm, ids, custom_generate=cfg_generate, **kwargs)


def test_right_padded_prompts_are_rejected(tiny_lm):
    ids = torch.tensor([[5, 17, 33], [7, 3, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        _gen(tiny_lm, ids, mask, guidance_scale=2.0, custom_generate=cfg_generate)


def test_encoder_decoder_models_are_rejected():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(
        T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, decoder_start_token_id=0)
    ).eval()
    with pytest.raises(ValueError, match="decoder-only"):
        model.generate(input_ids=torch.tensor([[3, 4, 5]]), guidance_scale=2.0, max_new_tokens=3,
                       custom_generate=cfg_generate)


def test_nan_logits_raise_a_clear_error(tiny_lm):
    import copy

    broken = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        broken.lm_head.weight[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _gen(broken, PROMPT, guidance_scale=2.0, custom_generate=cfg_generate)


def test_negative_prompt_reaches_a_schedule_through_the_cfg_argument(tiny_lm):
    ramp = Linear(1.0, 4.0)
    ours = _gen(tiny_lm, PROMPT, guidance_schedule=ramp, cfg_negative_prompt_ids=NEGATIVE,
                cfg_negative_prompt_attention_mask=torch.ones_like(NEGATIVE), custom_generate=cfg_generate)
    unconditional = ModelUnconditionalLogits(tiny_lm, context_ids=NEGATIVE)
    processor = CFGLogitsProcessor(1.0, unconditional, guidance_schedule=ramp, num_steps=12)
    assert torch.equal(ours, _gen(tiny_lm, PROMPT, logits_processor=LogitsProcessorList([processor])))
    without = _gen(tiny_lm, PROMPT, guidance_schedule=ramp, custom_generate=cfg_generate)
    assert not torch.equal(ours, without)


def test_both_negative_prompt_forms_at_once_are_rejected(tiny_lm):
    with pytest.raises(ValueError, match="either"):
        _gen(tiny_lm, PROMPT, guidance_scale=2.0, negative_prompt_ids=NEGATIVE, cfg_negative_prompt_ids=NEGATIVE,
             custom_generate=cfg_generate)


def test_guided_decoding_is_quiet(tiny_lm, recwarn):
    """No FutureWarning (deprecated cache keyword) or other warning from the guided loop."""
    _gen(tiny_lm, PROMPT, guidance_schedule=Window(scale=2.0, start_step=0, end_step=3), custom_generate=cfg_generate)
    _gen(tiny_lm, PROMPT, guidance_scale=2.0, num_beams=2, custom_generate=cfg_generate)
    assert [str(w.message) for w in recwarn.list] == []


def test_attentions_and_hidden_states_are_the_conditional_rows(tiny_lm):
    kwargs = dict(return_dict_in_generate=True, output_attentions=True, output_hidden_states=True, max_new_tokens=3)
    ids = torch.tensor([[5, 17, 33], [7, 3, 50]])
    out = _gen(tiny_lm, ids, guidance_scale=2.0, custom_generate=cfg_generate, **kwargs)
    assert len(out.attentions) == len(out.hidden_states) == 3
    assert all(layer.shape[0] == 2 for step in out.hidden_states for layer in step)
    assert all(layer.shape[0] == 2 for step in out.attentions for layer in step)


def test_processor_form_checks_unconditional_shape():
    processor = CFGLogitsProcessor(2.0, lambda ids: torch.zeros(1, 5))
    with pytest.raises(ValueError, match="shape"):
        processor(torch.tensor([[1, 2]]), torch.zeros(1, 7))
    with pytest.raises(ValueError, match="guidance_scale"):
        CFGLogitsProcessor(float("nan"), lambda ids: torch.zeros(1, 5))


@pytest.mark.slow
@pytest.mark.parametrize(("prompt", "scale", "use_negative"), [("The capital of France is", 1.5, False),
                                                                ("Once upon a time, a little dragon", 3.0, True)])
def test_embedded_model_matches_transformers_cfg_token_for_token(smollm2, prompt, scale, use_negative):
    """Two end-to-end cases on the real model; the scale x negative-prompt grid runs on the tiny model above."""
    model, tokenizer = smollm2
    inputs = tokenizer(prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=12, do_sample=False, guidance_scale=scale)
    if use_negative:
        negative = tokenizer("Write about cats.", return_tensors="pt")
        kwargs.update(negative_prompt_ids=negative.input_ids, negative_prompt_attention_mask=negative.attention_mask)
    reference = model.generate(**inputs, **kwargs)
    ours = model.generate(**inputs, **kwargs, custom_generate=cfg_generate)
    assert torch.equal(reference, ours)


@pytest.mark.slow
def test_embedded_model_scale_one_bit_identical(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer(["Tell me a joke.", "The weather today"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=10, return_dict_in_generate=True, output_scores=True, pad_token_id=tokenizer.pad_token_id)
    plain = model.generate(**inputs, **kwargs)
    ours = model.generate(**inputs, **kwargs, guidance_scale=1.0, custom_generate=cfg_generate)
    assert torch.equal(plain.sequences, ours.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, ours.scores, strict=True))


def test_typical_sampling_uses_the_sort_free_warper_and_keeps_transformers_tokens(tiny_lm, monkeypatch):
    import samplers.typical

    calls = []
    original = samplers.typical.LocallyTypicalWarper.__call__

    def counting_call(self, input_ids, scores):
        calls.append(scores.shape)
        return original(self, input_ids, scores)

    monkeypatch.setattr(samplers.typical.LocallyTypicalWarper, "__call__", counting_call)
    kwargs = dict(guidance_scale=2.0, do_sample=True, typical_p=0.7, temperature=0.9, seed=5)
    reference = _gen(tiny_lm, PROMPT, **kwargs)
    ours = _gen(tiny_lm, PROMPT, custom_generate=cfg_generate, **kwargs)
    assert len(calls) == 12
    assert torch.equal(reference, ours)
