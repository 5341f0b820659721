"""Every use of vLLM internals in one place (the CFG pair scheduler needs a few).

vLLM's plugin point for scheduling (``scheduler_cls``) is public, but a scheduler subclass
works with the engine core's ``Request`` objects and the model runner's output. What this
module touches, checked by ``tests/vllm/test_vllm_compat.py`` (which names the vLLM version when
it fails):

* ``vllm.v1.core.sched.scheduler.Scheduler``: ``add_request``, ``update_from_output``,
  ``finish_requests``, ``requests`` and ``running``;
* ``vllm.v1.request.Request`` and ``RequestStatus``: the constructor, ``num_computed_tokens``,
  ``is_prefill_chunk``, ``_block_hasher``, ``is_finished``;
* ``ModelRunnerOutput.sampled_token_ids`` / ``req_id_to_index``;
* the model runner trims its cached output tokens to the scheduler's count
  (``CachedRequestData.num_output_tokens``), which makes dropping a sampled token safe.
"""

from __future__ import annotations

from typing import Any

import vllm
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

__all__ = [
    "TESTED_VLLM_VERSIONS",
    "Request",
    "RequestStatus",
    "Scheduler",
    "drop_sampled_token",
    "new_companion_request",
    "sampled_tokens",
    "unsupported_engine_features",
]

#: vLLM versions the scheduler was tested with (other versions get a warning at engine start).
TESTED_VLLM_VERSIONS = ("0.32.0",)


def new_companion_request(cond: Request, request_id: str, prompt_ids: list[int], params: Any) -> Request:
    """An engine-core request for the unconditional branch of ``cond``, sharing its client, LoRA, priority."""
    return Request(
        request_id=request_id,
        prompt_token_ids=list(prompt_ids),
        sampling_params=params,
        pooling_params=None,
        client_index=cond.client_index,
        arrival_time=cond.arrival_time,
        lora_request=cond.lora_request,
        cache_salt=cond.cache_salt,
        priority=cond.priority,
        block_hasher=cond._block_hasher,
    )


def sampled_tokens(model_runner_output: Any, request_id: str) -> list[int]:
    """The tokens the model runner sampled for ``request_id`` this step ([] for a partial prefill)."""
    index = model_runner_output.req_id_to_index.get(request_id)
    sampled = model_runner_output.sampled_token_ids
    if index is None or not sampled:
        return []
    return list(sampled[index])


def drop_sampled_token(model_runner_output: Any, request: Request) -> None:
    """Discard what ``request`` sampled this step, as if the step had been a partial prefill.

    The token never reaches the request; ``num_computed_tokens`` steps back by one so the
    last token is computed again next time (its KV slot is rewritten), and the model runner,
    which cached the sampled token, drops it when it sees the scheduler's output-token count.
    """
    index = model_runner_output.req_id_to_index[request.request_id]
    model_runner_output.sampled_token_ids[index] = []
    request.num_computed_tokens -= 1
    request.is_prefill_chunk = True


def unsupported_engine_features(vllm_config: Any) -> list[str]:
    """Engine settings the pair scheduler cannot work with, as messages (empty when fine)."""
    problems = []
    if vllm_config.scheduler_config.async_scheduling:
        problems.append("async scheduling (pass async_scheduling=False / --no-async-scheduling)")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism (pipeline_parallel_size must be 1)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding")
    if getattr(vllm_config, "use_v2_model_runner", False):
        problems.append("Model Runner V2 (set VLLM_USE_V2_MODEL_RUNNER=0)")
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append("prefix caching (pass enable_prefix_caching=False / --no-enable-prefix-caching)")
    return problems


def vllm_version() -> str:
    return vllm.__version__
