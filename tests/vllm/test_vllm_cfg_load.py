"""CFG pairs under load: a KV cache small enough to preempt, a token budget that chunks prefills.

Each request's greedy tokens, run among many CFG and plain requests of mixed lengths, must
equal the same request run alone; the test also checks that the scheduler did preempt,
chunk, and discard lone samples (otherwise it would prove nothing).
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("vllm.sampling_params")  # a real vLLM (tests/vllm itself can look like a namespace package "vllm")

from vllm import SamplingParams  # noqa: E402

WORDS = "the a dragon flew over city river mountain king queen castle forest night day sun moon star sea wind".split()
BUDGET = 64  # tokens per step: prompts longer than this are prefilled in chunks


@pytest.fixture(scope="module")
def llm(shared_llm):
    # The shared engine: 416 KV tokens for all rows, 64 tokens per step (see conftest.SHARED_ENGINE).
    assert shared_llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens == BUDGET
    return shared_llm


def _requests(count: int = 12, seed: int = 0) -> list[tuple[str, SamplingParams]]:
    rng = random.Random(seed)
    requests = []
    for index in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 9, 40, 110, 118, 150])))
        extra: dict = {}
        if index % 3:
            extra["guidance_scale"] = rng.choice([1.5, 3.0])
            if index % 2:
                extra["negative_prompt"] = rng.choice(["boring", "the the the a a"])
        params = SamplingParams(temperature=0, max_tokens=rng.choice([6, 16, 32]), ignore_eos=True, extra_args=extra or None)
        requests.append((prompt, params))
    return requests


def test_each_output_equals_the_request_run_alone(llm, engine_core):
    scheduler = engine_core(llm).scheduler
    preemptions = []
    original = scheduler._preempt_request

    def counting(*args, **kwargs):
        preemptions.append(args[0].request_id)
        return original(*args, **kwargs)

    scheduler._preempt_request = counting
    requests = _requests()
    discarded_before = scheduler.discarded_samples
    try:
        together = llm.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=False)
    finally:
        del scheduler._preempt_request
    assert preemptions, "the KV budget was meant to force preemptions"
    assert scheduler.discarded_samples > discarded_before, "no pair was split: the test would prove nothing"
    assert max(len(o.prompt_token_ids) for o in together) > BUDGET  # chunked prefills happened
    assert not scheduler.requests and not scheduler.companions
    for (prompt, params), output in zip(requests, together, strict=True):
        alone = llm.generate([prompt], [params], use_tqdm=False)[0]
        assert list(output.outputs[0].token_ids) == list(alone.outputs[0].token_ids), params.extra_args
        assert len(output.outputs[0].token_ids) == params.max_tokens
