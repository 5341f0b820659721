"""The vLLM scheduler that runs each CFG request as a pair of rows that always sample together.

:class:`CFGScheduler` is vLLM's scheduler plus pairing (plug it in with ``scheduler_cls``):

1. **Companions.** A request with ``extra_args["guidance_scale"] != 1`` gets an unconditional
   companion request, created in the engine: prompt = the negative prompt (text tokenised
   with the model's tokenizer, or ``negative_prompt_token_ids``) or the request's last
   prompt token; greedy, no stop condition, never returned to the client (its outputs are
   dropped here, so they count in no usage or logprobs).
2. **Lock-step.** vLLM's scheduler may run one row of a pair without the other (a chunked
   prefill, a token budget running out between them, a preemption). After every step, a
   row that sampled while its partner did not has its token discarded and recomputes its
   last token later, exactly as if it had not been scheduled; so a token is kept only from
   a step where both rows sampled, and there :class:`guidance.vllm.CFGLogitsProcessor` gave
   both the same guided token. Correctness does not depend on the scheduler's choices,
   only the cost of a discarded step does.
3. **Lifetime.** The companion is aborted with its request (finished or aborted by the
   client); both rows of a pair share the client, priority and LoRA adapter.

All vLLM internals it uses live in :mod:`guidance.vllm._compat`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from vllm import SamplingParams

from guidance.vllm import _compat
from guidance.vllm.cfg import PAIR_KEY, ROLE_KEY, CFGSettings, cfg_settings

__all__ = ["COMPANION_SUFFIX", "CFGScheduler"]

logger = logging.getLogger(__name__)

#: Request id of a companion: the request's id plus this suffix.
COMPANION_SUFFIX = "::guidance-uncond"


class CFGScheduler(_compat.Scheduler):
    """vLLM's V1 scheduler with classifier-free-guidance pairs (see the module docstring).

    Use it with ``vllm.LLM(..., scheduler_cls=CFGScheduler, logits_processors=[CFGLogitsProcessor])``
    or ``vllm serve MODEL --scheduler-cls guidance.vllm.CFGScheduler --logits-processors
    guidance.vllm.cfg:CFGLogitsProcessor``, with async scheduling and prefix caching off (the
    engine refuses to start otherwise, naming the setting). :func:`guidance.vllm.engine_kwargs`
    returns all of it. Requests without ``guidance_scale`` are scheduled exactly as by vLLM.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        problems = _compat.unsupported_engine_features(self.vllm_config)
        if problems:
            raise ValueError("CFGScheduler cannot run with " + "; ".join(problems) + ".")
        if _compat.vllm_version() not in _compat.TESTED_VLLM_VERSIONS:
            logger.warning(
                "CFGScheduler was tested with vLLM %s, this is %s.",
                ", ".join(_compat.TESTED_VLLM_VERSIONS),
                _compat.vllm_version(),
            )
        self.companions: dict[str, str] = {}  # request id -> companion id
        self.conds: dict[str, str] = {}  # companion id -> request id
        self.discarded_samples = 0
        self._tokenizer: Any = None

    # -- admission ---------------------------------------------------------------------------

    def _tokenize(self, text: str) -> list[int]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            config = self.vllm_config.model_config
            self._tokenizer = AutoTokenizer.from_pretrained(
                config.tokenizer, revision=config.tokenizer_revision, trust_remote_code=config.trust_remote_code
            )
        return list(self._tokenizer.encode(text))

    def _unconditional_prompt(self, request: Any, settings: CFGSettings) -> list[int]:
        if settings.negative_prompt_token_ids is not None:
            return list(settings.negative_prompt_token_ids)
        if settings.negative_prompt is not None:
            ids = self._tokenize(settings.negative_prompt)
            if ids:
                return ids
        return list(request.prompt_token_ids[-1:])

    def add_request(self, request: Any) -> None:
        params = request.sampling_params
        settings = cfg_settings(params) if params is not None else None
        if settings is None or request.prompt_token_ids is None or request.request_id in self.requests:
            super().add_request(request)
            return
        pair = request.request_id
        prompt = self._unconditional_prompt(request, settings)
        max_len = self.vllm_config.model_config.max_model_len
        # The longer context reaches max_model_len first; stop the pair there ("length").
        request.max_tokens = max(1, min(request.max_tokens, max_len - len(prompt)))
        cond_params = params.clone()
        cond_params.extra_args = {**(params.extra_args or {}), PAIR_KEY: pair, ROLE_KEY: "cond"}
        request.sampling_params = cond_params
        companion_params = SamplingParams(
            max_tokens=request.max_tokens + 1,
            temperature=0.0,
            ignore_eos=True,
            detokenize=False,
            extra_args={PAIR_KEY: pair, ROLE_KEY: "uncond"},
        )
        companion_id = pair + COMPANION_SUFFIX
        companion = _compat.new_companion_request(request, companion_id, prompt, companion_params)
        self.companions[pair] = companion_id
        self.conds[companion_id] = pair
        super().add_request(request)
        super().add_request(companion)

    # -- lock-step ---------------------------------------------------------------------------

    def _discard_lone_samples(self, scheduler_output: Any, model_runner_output: Any) -> None:
        scheduled = scheduler_output.num_scheduled_tokens
        for pair, companion_id in self.companions.items():
            if pair not in scheduled and companion_id not in scheduled:
                continue
            cond_tokens = _compat.sampled_tokens(model_runner_output, pair) if pair in scheduled else []
            uncond_tokens = (
                _compat.sampled_tokens(model_runner_output, companion_id) if companion_id in scheduled else []
            )
            if cond_tokens and uncond_tokens:
                if cond_tokens != uncond_tokens:
                    raise RuntimeError(
                        f"CFG pair {pair!r} sampled {cond_tokens} and {uncond_tokens}: a logits processor after "
                        "CFGLogitsProcessor changed the guided token; list CFGLogitsProcessor last."
                    )
                continue
            for request_id, tokens in ((pair, cond_tokens), (companion_id, uncond_tokens)):
                request = self.requests.get(request_id)
                if tokens and request is not None and not request.is_finished():
                    _compat.drop_sampled_token(model_runner_output, request)
                    self.discarded_samples += 1

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> dict[int, Any]:
        if self.companions:
            self._discard_lone_samples(scheduler_output, model_runner_output)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self.companions:
            self._end_finished_pairs()
            for engine_outputs in outputs.values():
                engine_outputs.outputs = [o for o in engine_outputs.outputs if o.request_id not in self.conds]
        return outputs

    # -- lifetime ----------------------------------------------------------------------------

    def _end_finished_pairs(self) -> None:
        ended = [
            pair
            for pair in self.companions
            if (request := self.requests.get(pair)) is None or request.is_finished()
        ]
        if ended:
            companions = [self.companions[pair] for pair in ended]
            super().finish_requests(companions, _compat.RequestStatus.FINISHED_ABORTED)
            for pair, companion_id in zip(ended, companions, strict=True):
                del self.companions[pair]
                del self.conds[companion_id]

    def finish_requests(self, request_ids: str | Iterable[str] | None, finished_status: Any) -> list[Any]:
        if request_ids is not None:
            ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
            request_ids = ids + [self.companions[i] for i in ids if i in self.companions]
        finished = super().finish_requests(request_ids, finished_status)
        self._end_finished_pairs()
        return finished
