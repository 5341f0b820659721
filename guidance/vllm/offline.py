"""Offline use: the engine settings for the processors, and CFG generation for a list of prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm import SamplingParams

from guidance.validation import check_finite
from guidance.vllm.cfg import CFGLogitsProcessor
from guidance.vllm.scheduler import CFGScheduler
from guidance.vllm.typical import TypicalLogitsProcessor

__all__ = ["engine_kwargs", "generate", "uses_cfg_scheduler"]


def engine_kwargs(*, cfg: bool = True, typical: bool = True, classifier: Any = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(model, **engine_kwargs())`` that enable this package's processors.

    Args:
        cfg (`bool`): CFG pairs: :class:`CFGScheduler`, :class:`CFGLogitsProcessor` (listed last),
            async scheduling and prefix caching off (the pair scheduler needs both off).
        typical (`bool`): :class:`TypicalLogitsProcessor` (``extra_args["typical_p"]``).
        classifier (`type | None`): a classifier-weighted logits processor class, e.g. made
            with :func:`guidance.vllm.classifier_processor`.

    Example:
        >>> from guidance.vllm import engine_kwargs
        >>> sorted(engine_kwargs())
        ['async_scheduling', 'enable_prefix_caching', 'logits_processors', 'scheduler_cls']
        >>> [p.__name__ for p in engine_kwargs()["logits_processors"]]
        ['TypicalLogitsProcessor', 'CFGLogitsProcessor']
    """
    processors: list[Any] = []
    if typical:
        processors.append(TypicalLogitsProcessor)
    if classifier is not None:
        processors.append(classifier)
    kwargs: dict[str, Any] = {"logits_processors": processors}
    if cfg:
        processors.append(CFGLogitsProcessor)
        kwargs.update(scheduler_cls=CFGScheduler, async_scheduling=False, enable_prefix_caching=False)
    return kwargs


def uses_cfg_scheduler(llm: Any) -> bool:
    """Whether the ``vllm.LLM`` was built with :class:`CFGScheduler` (needed for ``guidance_scale``)."""
    scheduler_cls = llm.llm_engine.vllm_config.scheduler_config.scheduler_cls
    if isinstance(scheduler_cls, str):
        return scheduler_cls.replace(":", ".").endswith("CFGScheduler")
    return isinstance(scheduler_cls, type) and issubclass(scheduler_cls, CFGScheduler)


def _negative_ids(llm: Any, negative_prompts: Any, count: int) -> list[list[int] | None]:
    if negative_prompts is None:
        return [None] * count
    items = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
    if items and all(isinstance(i, int) for i in items):
        items = [items]  # one token-id list for all prompts
    if len(items) not in (1, count):
        raise ValueError(f"`negative_prompts` has {len(items)} entries; it must have 1 or {count} (one per prompt).")
    tokenizer = llm.get_tokenizer()
    ids = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ValueError("`negative_prompts` must not contain empty strings.")
            ids.append(list(tokenizer.encode(item)))
        elif isinstance(item, Sequence) and item and all(isinstance(i, int) for i in item):
            ids.append(list(item))
        else:
            raise TypeError(f"`negative_prompts` entries must be strings or lists of token ids, got {item!r}.")
    return ids * count if len(ids) == 1 else ids


def generate(
    llm: Any,
    prompts: Any,
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    guidance_scale: float,
    negative_prompts: str | Sequence[str] | Sequence[Sequence[int]] | None = None,
    use_tqdm: bool = False,
) -> list[Any]:
    """Classifier-free guided generation with a ``vllm.LLM``: one ``RequestOutput`` per prompt, in order.

    ``llm`` must be built with :func:`engine_kwargs` (or at least ``scheduler_cls=CFGScheduler``
    and ``CFGLogitsProcessor``). Every prompt runs as a pair of rows (the prompt and its
    unconditional context) with ``u + w (c - u)`` in log-probabilities; the sampling settings
    (temperature, top-k/p, min-p, penalties, seed, ``typical_p`` in ``extra_args``) act on the
    guided distribution; ``guidance_scale=1`` is plain vLLM generation.

    Args:
        llm: a ``vllm.LLM``.
        prompts: what ``llm.generate`` accepts (strings, ``TokensPrompt`` dicts, ...).
        sampling_params: one ``SamplingParams`` for all prompts or one per prompt (default:
            vLLM's defaults). They are copied, never modified.
        guidance_scale (`float`): ``w``, any finite number; 1 is off.
        negative_prompts: the unconditional context: one string (or token-id list) for all
            prompts, or one per prompt. Default: each prompt's last token.
        use_tqdm (`bool`): show vLLM's progress bar.

    Example (an engine start takes about a minute on a CPU):

    ```python
    >>> from vllm import LLM, SamplingParams  # doctest: +SKIP
    >>> import guidance.vllm as gv  # doctest: +SKIP
    >>> llm = LLM(model=str(gv.default_model_folder()), **gv.engine_kwargs())  # doctest: +SKIP
    >>> outs = gv.generate(llm, ["Write a haiku about the sea."], SamplingParams(temperature=0, max_tokens=32),
    ...                    guidance_scale=1.5, negative_prompts="Write a poem.")  # doctest: +SKIP
    >>> outs[0].outputs[0].text  # doctest: +SKIP
    ```
    """
    scale = check_finite(guidance_scale, "guidance_scale")
    if not uses_cfg_scheduler(llm):
        raise ValueError(
            "This vLLM engine was not built for CFG: create it with "
            "`LLM(model, **guidance.vllm.engine_kwargs())` (scheduler_cls=CFGScheduler and CFGLogitsProcessor)."
        )
    prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    if not prompt_list:
        raise ValueError("`prompts` must not be empty.")
    count = len(prompt_list)
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        params_list = [sampling_params or SamplingParams()] * count
    else:
        params_list = list(sampling_params)
        if len(params_list) != count:
            raise ValueError(f"`sampling_params` has {len(params_list)} entries for {count} prompts.")
    negatives = _negative_ids(llm, negative_prompts, count)
    guided = []
    for params, negative in zip(params_list, negatives, strict=True):
        params = params.clone()
        extra = dict(params.extra_args or {})
        extra["guidance_scale"] = scale
        if negative is not None:
            extra["negative_prompt_token_ids"] = negative
        params.extra_args = extra
        guided.append(params)
    return llm.generate(prompt_list, guided, use_tqdm=use_tqdm)
