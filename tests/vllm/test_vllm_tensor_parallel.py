"""CFG pairs with tensor_parallel_size=2 on vLLM's CPU backend (two worker processes).

The embedded SmolLM2 has 9 attention heads, which 2 ranks cannot split, so this runs a small
random Llama (4 heads, SmolLM2's tokenizer) and compares with ``cfg_generate`` on the same
weights.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm.sampling_params")  # a real vLLM (tests/vllm itself can look like a namespace package "vllm")
if os.environ.get("GUIDANCE_VLLM_TP", "0") in ("", "0"):
    pytest.skip("two more worker processes; opt in with GUIDANCE_VLLM_TP=1", allow_module_level=True)

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402

import guidance.vllm as gv  # noqa: E402
from guidance.lm import cfg_generate  # noqa: E402

PROMPTS = ["Today a dragon flew over Paris", "The capital of France is"]


@pytest.fixture(scope="module")
def tiny_model(model_folder, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # spread the logits: greedy choices far from ties
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), model


@pytest.fixture(scope="module")
def llm(build_llm, tiny_model):
    return build_llm(model=tiny_model[0], tensor_parallel_size=2, distributed_executor_backend="mp",
                     **gv.engine_kwargs())


def test_cfg_with_two_tensor_parallel_ranks_equals_cfg_generate(llm, tiny_model):
    outputs = gv.generate(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                          guidance_scale=1.5)
    model = tiny_model[1]
    for output in outputs:
        ids = torch.tensor([output.prompt_token_ids])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                                  do_sample=False, guidance_scale=1.5, custom_generate=cfg_generate, pad_token_id=2)
        assert list(output.outputs[0].token_ids) == expected[0, ids.shape[1]:].tolist()
    assert llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
