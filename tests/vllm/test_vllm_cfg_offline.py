"""CFG and typical_p in an offline vLLM engine (one engine for the module): parity with the transformers path."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.sampling_params")  # a real vLLM (tests/vllm itself can look like a namespace package "vllm")

import torch  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

import guidance.vllm as gv  # noqa: E402
from guidance.lm import cfg_generate  # noqa: E402
from samplers import LocallyTypicalWarper  # noqa: E402

PROMPTS = [
    "Today a dragon flew over Paris",
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
NEGATIVE = "A boring list of numbers"
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def llm(shared_llm):
    return shared_llm


@pytest.fixture(scope="module")
def reference(model_folder):
    from guidance.models import load_causal_lm

    return load_causal_lm(model_folder)


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def _cfg_generate(reference, prompt_ids, scale, negative_ids=None, **kwargs) -> list[int]:
    model, tokenizer = reference
    ids = torch.tensor([prompt_ids])
    extra = {}
    if negative_ids is not None:
        negative = torch.tensor([negative_ids])
        extra = dict(negative_prompt_ids=negative, negative_prompt_attention_mask=torch.ones_like(negative))
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, guidance_scale=scale,
        custom_generate=cfg_generate, pad_token_id=tokenizer.eos_token_id, **extra, **kwargs,
    )
    tokens = out[0, ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("scale,negative", [(1.5, None), (3.0, None), (2.0, NEGATIVE), (0.5, NEGATIVE)])
def test_greedy_tokens_equal_cfg_generate(llm, reference, scale, negative):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outputs = gv.generate(llm, PROMPTS, params, guidance_scale=scale, negative_prompts=negative)
    assert [o.prompt for o in outputs] == PROMPTS
    negative_ids = None if negative is None else reference[1].encode(negative)
    expected = [_cfg_generate(reference, o.prompt_token_ids, scale, negative_ids) for o in outputs]
    assert _tokens(outputs) == expected
    assert sum(map(len, expected)) > 2 * MAX_TOKENS  # the continuations are not empty


def test_drop_in_form_and_engine_side_negative_prompt(llm, reference):
    helper = gv.generate(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), guidance_scale=2.0,
                         negative_prompts=NEGATIVE)
    text = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                        extra_args={"guidance_scale": 2.0, "negative_prompt": NEGATIVE}), use_tqdm=False)
    ids = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                       extra_args={"guidance_scale": 2.0, "negative_prompt_token_ids": reference[1].encode(NEGATIVE)}),
                       use_tqdm=False)
    assert _tokens(helper) == _tokens(text) == _tokens(ids)


def test_scale_one_is_plain_vllm_bit_for_bit(llm):
    plain = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=3), use_tqdm=False)
    off = gv.generate(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=3),
                      guidance_scale=1.0, negative_prompts=NEGATIVE)
    assert _tokens(plain) == _tokens(off)
    assert [o.outputs[0].logprobs for o in plain] == [o.outputs[0].logprobs for o in off]


def test_companions_stay_inside_the_engine(llm, engine_core):
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=8, logprobs=2, n=2)
    outputs = gv.generate(llm, PROMPTS, params, guidance_scale=2.0)
    assert len(outputs) == len(PROMPTS)
    for output in outputs:
        assert len(output.outputs) == 2
        for completion in output.outputs:
            assert len(completion.token_ids) == 8 or completion.finish_reason == "stop"
            assert len(completion.logprobs) == len(completion.token_ids)
            assert all(token in step for token, step in zip(completion.token_ids, completion.logprobs, strict=True))
    scheduler = engine_core(llm).scheduler
    assert not scheduler.requests and not scheduler.companions and not scheduler.conds


def test_sampled_tokens_follow_the_seed_not_the_batch(llm):
    def run(prompts, seed):
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed, max_tokens=12,
                                extra_args={"guidance_scale": 1.5, "typical_p": 0.95})
        return _tokens(llm.generate(prompts, params, use_tqdm=False))

    together = run(PROMPTS, 7)
    assert together == run(PROMPTS, 7)
    assert [run([p], 7)[0] for p in PROMPTS] == together
    assert run(PROMPTS, 8) != together


def test_typical_p_keeps_the_warper_set_alone_and_with_cfg(llm, reference):
    """With typical_p tiny only the most typical token survives: sampling is deterministic, so tokens must match."""
    model, tokenizer = reference
    typical = SamplingParams(temperature=1.0, seed=0, max_tokens=MAX_TOKENS, extra_args={"typical_p": 1e-6})
    plain = llm.generate(PROMPTS, typical, use_tqdm=False)
    guided = gv.generate(llm, PROMPTS, typical, guidance_scale=1.5)
    for output, cfg_output in zip(plain, guided, strict=True):
        ids = torch.tensor([output.prompt_token_ids])
        warper = LocallyTypicalWarper(1e-6)
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=MAX_TOKENS,
                                  top_k=0, top_p=1.0, temperature=1.0, logits_processor=LogitsProcessorList([warper]), pad_token_id=tokenizer.eos_token_id)
        tokens = expected[0, ids.shape[1]:].tolist()
        assert list(output.outputs[0].token_ids) == tokens[: len(output.outputs[0].token_ids)]
        assert list(cfg_output.outputs[0].token_ids) == _cfg_generate(
            reference, output.prompt_token_ids, 1.5, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, typical_p=1e-6
        )[: len(cfg_output.outputs[0].token_ids)]
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert _tokens(plain) != _tokens(greedy)  # the most typical token is not always the most likely one


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"guidance_scale": "2"}, "guidance_scale"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"negative_prompt": "x"}, "needs `guidance_scale`"),
        ({"guidance_scale": 2.0, "negative_prompt_token_ids": []}, "negative_prompt_token_ids"),
        ({"guidance_scale": 2.0, "_guidance_pair": "x"}, "set by the engine"),
        ({"typical_p": 0.0}, "typical_p"),
    ],
)
def test_bad_requests_fail_at_admission(llm, extra, message):
    with pytest.raises(VLLMValidationError, match=message):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)


def test_unsupported_features_fail_at_admission(llm):
    with pytest.raises(VLLMValidationError, match="logit_bias"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, logit_bias={5: 1.0},
                                                 extra_args={"guidance_scale": 2.0}), use_tqdm=False)
    with pytest.raises(VLLMValidationError, match="prompt_logprobs"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, prompt_logprobs=1,
                                                 extra_args={"guidance_scale": 2.0}), use_tqdm=False)
    assert _tokens(llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False))[0]


def test_helper_refuses_an_engine_without_the_pair_scheduler(llm):
    class Plain:
        llm_engine = type("E", (), {"vllm_config": type("C", (), {"scheduler_config": type("S", (), {
            "scheduler_cls": None})()})()})()

    with pytest.raises(ValueError, match="engine_kwargs"):
        gv.generate(Plain(), PROMPTS, guidance_scale=2.0)
    with pytest.raises(ValueError, match="negative_prompts"):
        gv.generate(llm, PROMPTS, guidance_scale=2.0, negative_prompts=["a", "b"])
    with pytest.raises(TypeError, match="guidance_scale"):
        gv.generate(llm, PROMPTS, guidance_scale="2")
