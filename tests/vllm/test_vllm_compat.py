"""The vLLM internals guidance.vllm._compat relies on, checked without an engine (fails naming the version)."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm.sampling_params")  # a real vLLM, not the namespace package tests/vllm
import vllm  # noqa: E402
from vllm import SamplingParams  # noqa: E402

from guidance.vllm import _compat  # noqa: E402
from guidance.vllm.cfg import CFGSettings, cfg_settings  # noqa: E402

VERSION = f"vLLM {vllm.__version__} (guidance.vllm was tested with {', '.join(_compat.TESTED_VLLM_VERSIONS)})"


def _has(obj, *names):
    missing = [name for name in names if not hasattr(obj, name)]
    assert not missing, f"{VERSION}: {obj.__name__} lacks {missing}; update guidance/vllm/_compat.py"


def test_scheduler_hooks_exist():
    _has(_compat.Scheduler, "add_request", "update_from_output", "finish_requests", "schedule", "_preempt_request")
    parameters = inspect.signature(_compat.Scheduler.update_from_output).parameters
    assert list(parameters)[1:3] == ["scheduler_output", "model_runner_output"], VERSION


def test_request_constructor_and_fields():
    parameters = inspect.signature(_compat.Request.__init__).parameters
    needed = {"request_id", "prompt_token_ids", "sampling_params", "pooling_params", "client_index", "arrival_time",
              "lora_request", "cache_salt", "priority", "block_hasher"}
    assert needed <= set(parameters), f"{VERSION}: Request() lacks {needed - set(parameters)}"
    request = _compat.Request("r", [1, 2, 3], SamplingParams(max_tokens=4), None)
    for name in ("num_computed_tokens", "is_prefill_chunk", "_block_hasher", "client_index", "max_tokens"):
        assert hasattr(request, name), f"{VERSION}: Request has no {name}"
    companion = _compat.new_companion_request(request, "r::u", [7], SamplingParams(max_tokens=5))
    assert companion.prompt_token_ids == [7] and companion.max_tokens == 5 and companion.num_prompt_tokens == 1
    assert _compat.RequestStatus.FINISHED_ABORTED.name == "FINISHED_ABORTED"


def test_runner_output_and_cached_request_fields():
    from vllm.v1.core.sched.output import CachedRequestData
    from vllm.v1.outputs import ModelRunnerOutput

    fields = {f.name for f in dataclasses.fields(ModelRunnerOutput)}
    assert {"req_ids", "req_id_to_index", "sampled_token_ids"} <= fields, VERSION
    assert "num_output_tokens" in {f.name for f in dataclasses.fields(CachedRequestData)}, (
        f"{VERSION}: the model runner no longer learns the output-token count, so a discarded sample would stay "
        "in its cache"
    )
    output = ModelRunnerOutput(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1}, sampled_token_ids=[[5], [6]])
    request = _compat.Request("a", [1, 2], SamplingParams(max_tokens=4), None)
    request.num_computed_tokens = 2
    assert _compat.sampled_tokens(output, "a") == [5] and _compat.sampled_tokens(output, "zz") == []
    _compat.drop_sampled_token(output, request)
    assert output.sampled_token_ids == [[], [6]] and request.num_computed_tokens == 1 and request.is_prefill_chunk


def _config(**overrides):
    config = SimpleNamespace(
        scheduler_config=SimpleNamespace(async_scheduling=False),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1),
        speculative_config=None,
        use_v2_model_runner=False,
        cache_config=SimpleNamespace(enable_prefix_caching=False),
    )
    for path, value in overrides.items():
        target, _, name = path.rpartition(".")
        setattr(getattr(config, target) if target else config, name, value)
    return config


@pytest.mark.parametrize(
    "override,message",
    [
        ({"scheduler_config.async_scheduling": True}, "async scheduling"),
        ({"parallel_config.pipeline_parallel_size": 2}, "pipeline parallelism"),
        ({"speculative_config": object()}, "speculative decoding"),
        ({"use_v2_model_runner": True}, "VLLM_USE_V2_MODEL_RUNNER=0"),
        ({"cache_config.enable_prefix_caching": True}, "prefix caching"),
    ],
)
def test_engine_settings_the_pair_scheduler_refuses(override, message):
    assert _compat.unsupported_engine_features(_config()) == []
    problems = _compat.unsupported_engine_features(_config(**override))
    assert len(problems) == 1 and message in problems[0]


def test_cfg_settings():
    assert cfg_settings(SamplingParams(extra_args={"guidance_scale": 2, "negative_prompt_token_ids": [3, 4]})) == (
        CFGSettings(2.0, None, (3, 4))
    )
    assert cfg_settings(SamplingParams()) is None
    with pytest.raises(ValueError, match="not both"):
        cfg_settings(SamplingParams(extra_args={"guidance_scale": 2, "negative_prompt": "a",
                                                "negative_prompt_token_ids": [1]}))
    with pytest.raises(ValueError, match="negative_prompt_token_ids"):
        cfg_settings(SamplingParams(extra_args={"guidance_scale": 2, "negative_prompt_token_ids": [1, -2]}))
    with pytest.raises(TypeError, match="negative_prompt"):
        cfg_settings(SamplingParams(extra_args={"guidance_scale": 2, "negative_prompt": ""}))


def test_core_and_transformers_path_never_import_vllm():
    code = (
        "import sys, guidance, guidance.lm, guidance.ops, guidance.guiders, guidance.classifier, samplers\n"
        "from guidance.lm import cfg_generate\n"
        "assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('vllm'))\n"
        "import guidance.vllm\n"
        "assert 'vllm' not in sys.modules  # the adapter's package loads vllm only when a name is used\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
