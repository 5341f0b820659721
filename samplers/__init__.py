"""How the next token or latent is drawn: locally typical sampling, fused CFG kernels, CFG++ steps.

Layering: ``samplers`` depends on the guidance core only (:mod:`guidance.ops`,
:mod:`guidance.spaces`, :mod:`guidance.validation`), never on the adapters
(``guidance.lm``, ``guidance.diffusion``, ``guidance.vllm``), and imports neither
transformers, diffusers, vllm nor triton when it is imported. The names below load on first
use (PEP 562): ``import samplers`` costs no more than ``import torch``.

Modules:

* :mod:`samplers.kernels`: :func:`~samplers.kernels.cfg_log_softmax`,
  :func:`~samplers.kernels.typical_filter`, :func:`~samplers.kernels.cfg_typical_sample`
  (Triton on CUDA, PyTorch elsewhere) and :func:`~samplers.kernels.fused_warpers_supported`;
* :mod:`samplers.typical`: :class:`~samplers.typical.LocallyTypicalWarper`, a drop-in for
  transformers' ``TypicalLogitsWarper``;
* :mod:`samplers.cfgpp`: CFG++ steps and loops for diffusion samplers.

Example:
    >>> import samplers
    >>> samplers.LocallyTypicalWarper(0.9)
    LocallyTypicalWarper(mass=0.9, min_tokens_to_keep=1, filter_value=-inf, check_finite=True)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "cfgpp": "samplers.cfgpp",
    "kernels": "samplers.kernels",
    "typical": "samplers.typical",
    "LocallyTypicalWarper": "samplers.typical",
    "FusedSampling": "samplers.kernels",
    "cfg_log_softmax": "samplers.kernels",
    "cfg_typical_sample": "samplers.kernels",
    "fused_warpers_supported": "samplers.kernels",
    "typical_filter": "samplers.kernels",
    "cfgpp_step": "samplers.cfgpp",
    "ddim_cfgpp_step": "samplers.cfgpp",
    "euler_ancestral_cfgpp_step": "samplers.cfgpp",
    "euler_cfgpp_step": "samplers.cfgpp",
    "flow_euler_cfgpp_step": "samplers.cfgpp",
    "get_ancestral_step": "samplers.cfgpp",
    "sample_ddim_cfgpp": "samplers.cfgpp",
    "sample_euler_ancestral_cfgpp": "samplers.cfgpp",
    "sample_euler_cfgpp": "samplers.cfgpp",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'samplers' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__ == f"samplers.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
