"""ClassifierLogitsProcessor in an engine: the tokens of guidance.lm's CAIF processor, one classifier call per step."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.sampling_params")  # a real vLLM (tests/vllm itself can look like a namespace package "vllm")

import torch  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from guidance.lm.steering import ClassifierWeightedLogitsProcessor  # noqa: E402
from guidance.vllm.classifier import ClassifierLogitsProcessor  # noqa: E402

PROMPTS = ["The movie was", "My day at work was", "The food at the new restaurant"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def llm(shared_llm):
    return shared_llm


@pytest.fixture(scope="module")
def reference(model_folder):
    from guidance.models import load_causal_lm
    from guidance.models.sentiment import load_sentiment_classifier

    model, tokenizer = load_causal_lm(model_folder)
    return model, tokenizer, load_sentiment_classifier()


def _processor(llm):
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    return next(p for p in runner.input_batch.logitsprocs.all if isinstance(p, ClassifierLogitsProcessor))


@pytest.mark.parametrize("alpha,label", [(4.0, "positive"), (-4.0, "positive"), (3.0, 0)])
def test_greedy_tokens_equal_the_transformers_processor(llm, reference, alpha, label):
    model, tokenizer, classifier = reference
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                            extra_args={"classifier_alpha": alpha, "classifier_label": label})
    processor = _processor(llm)
    calls, steps = processor.stats["classifier_calls"], processor.stats["steps"]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert processor.stats["classifier_calls"] - calls == processor.stats["steps"] - steps > 0
    assert processor.stats["steps"] - steps <= MAX_TOKENS + 1  # all rows of a step share one call
    plain = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for output in outputs:
        ids = torch.tensor([output.prompt_token_ids])
        steer = ClassifierWeightedLogitsProcessor(tokenizer, classifier, alpha=alpha, top_k=20, label=label)
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                                  logits_processor=LogitsProcessorList([steer]), pad_token_id=tokenizer.eos_token_id)
        tokens = expected[0, ids.shape[1]:].tolist()
        got = list(output.outputs[0].token_ids)
        assert got == tokens[: len(got)]
    assert [o.outputs[0].token_ids for o in outputs] != [o.outputs[0].token_ids for o in plain]


def test_unsteered_rows_in_the_same_batch_are_untouched(llm):
    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    steered = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args={"classifier_alpha": 4.0})
    alone = llm.generate(PROMPTS, plain, use_tqdm=False)
    mixed = llm.generate(PROMPTS * 2, [plain] * 3 + [steered] * 3, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == [o.outputs[0].token_ids for o in alone]


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"classifier_alpha": "big"}, "classifier_alpha"),
        ({"classifier_alpha": 1.0, "classifier_top_k": 0}, "classifier_top_k"),
        ({"classifier_label": "positive"}, "need `classifier_alpha`"),
        ({"classifier_alpha": 1.0, "guidance_scale": 2.0}, "guidance_scale"),
    ],
)
def test_bad_settings_fail_at_admission(llm, extra, message):
    with pytest.raises(VLLMValidationError, match=message):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
