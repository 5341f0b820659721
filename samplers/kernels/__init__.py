"""Fused CFG / typical-sampling kernels and the dispatcher that picks their implementation.

Every function here runs the Triton kernels of :mod:`samplers.kernels.triton_kernels` when its
input is a CUDA tensor of float16/bfloat16/float32, Triton imports and the environment
variable ``GUIDANCE_DISABLE_TRITON`` is not ``1``; otherwise the PyTorch path of
:mod:`samplers.kernels.reference` (the same semantics, any device, no Triton needed).

* :func:`cfg_log_softmax`: the log-prob CFG combine of :func:`guidance.ops.cfg_log_probs`;
* :func:`typical_filter`: locally typical filter, transformers' ``TypicalLogitsWarper``
  semantics with an exact (float64) boundary, sort-free;
* :func:`cfg_typical_sample`: CFG + temperature + typical filter + draw, one kernel on CUDA.

Speed (``benchmarks/typical_sampling.py``; results in ``benchmarks/results/``): on CPU the
PyTorch path is 3-7x faster than transformers' sort-based ``TypicalLogitsWarper`` at every
size tried (32k-256k tokens, batch 1-256). On an H100 the Triton kernels run one program per
row: the fused CFG + log-softmax beats ``cfg_log_probs`` everywhere (1.2-4.7x), the typical
kernels beat transformers' sort at batch 256 (about 2x) but not at batch 1-32 with 128k+
tokens, where one row on one SM is slower than a device-wide sort.

Errors: bad arguments raise ``ValueError`` before any work; NaN / +inf logits raise
``ValueError`` (on CUDA after the kernel, which detects them in its first pass, so that a
clean call costs no extra pass); rows that are entirely ``-inf`` are returned unchanged by
:func:`typical_filter` and raise ``ValueError`` in :func:`cfg_typical_sample`.
"""

from __future__ import annotations

import functools
import math
import os
from types import ModuleType

import torch
from torch import Tensor

from guidance.ops import cfg_log_probs, validate_scale
from samplers.kernels import reference
from samplers.kernels.reference import (
    check_logits,
    row_uniforms,
    validate_mass,
    validate_min_tokens_to_keep,
    validate_temperature,
)

__all__ = [
    "DISABLE_TRITON_ENV",
    "cfg_log_softmax",
    "cfg_typical_sample",
    "triton_available",
    "typical_filter",
    "uses_triton",
]

DISABLE_TRITON_ENV = "GUIDANCE_DISABLE_TRITON"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def _triton_module() -> ModuleType | None:
    try:
        from samplers.kernels import triton_kernels
    except ImportError:  # triton not installed (or a CPU-only build without its CUDA backend)
        return None
    return triton_kernels


def triton_available() -> bool:
    """Whether the Triton kernels can be imported (Triton installed)."""
    return _triton_module() is not None


def uses_triton(*tensors: Tensor) -> bool:
    """Whether a call on these tensors takes the Triton path."""
    if os.environ.get(DISABLE_TRITON_ENV, "0") not in ("", "0"):
        return False
    if not all(t.is_cuda and t.dtype in _TRITON_DTYPES and t.ndim == 2 for t in tensors):
        return False
    return triton_available()


def cfg_log_softmax(cond_logits: Tensor, uncond_logits: Tensor, scale: float | Tensor) -> Tensor:
    """Log-prob CFG ``log_softmax(u) + w (log_softmax(c) - log_softmax(u))``, fused on CUDA.

    Exactly the semantics of :func:`guidance.ops.cfg_log_probs` (which is the PyTorch path):
    ``scale`` a float or a (B,) tensor; at ``scale == 1`` ``cond_logits`` is returned itself; a
    token that is ``-inf`` in either branch stays ``-inf``; float32 out (float64 for float64 in).
    The Triton kernel reads each input twice and writes the result once.

    Example:
        >>> import torch
        >>> from samplers.kernels import cfg_log_softmax
        >>> out = cfg_log_softmax(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), 1.5)
        >>> torch.round(out, decimals=4)
        tensor([[ 0.1562, -2.8438]])
    """
    if not isinstance(scale, Tensor) and scale == 1:
        return cfg_log_probs(cond_logits, uncond_logits, scale)
    if isinstance(scale, Tensor) and scale.numel() not in (1, cond_logits.shape[0]):
        return cfg_log_probs(cond_logits, uncond_logits, scale)
    if cond_logits.shape == uncond_logits.shape and uses_triton(cond_logits, uncond_logits):
        return _triton_module().cfg_log_softmax_triton(cond_logits, uncond_logits, scale)
    return cfg_log_probs(cond_logits, uncond_logits, scale)


def typical_filter(
    scores: Tensor, mass: float, min_tokens_to_keep: int = 1, filter_value: float = -math.inf
) -> Tensor:
    """Locally typical filter: scores of tokens outside the typical set become ``filter_value``.

    transformers' ``TypicalLogitsWarper`` semantics (the crossing token kept, ties kept, at
    least ``min_tokens_to_keep`` tokens, ``mass == 1`` returns ``scores`` itself), but without
    a sort and with the boundary decided by float64 sums (see :mod:`samplers.typical`).
    ``scores`` is (B, V) or (V,), any float dtype (selection in float32, output in the input
    dtype). Rows that are entirely ``-inf`` are returned unchanged.

    Example:
        >>> import torch
        >>> from samplers.kernels import typical_filter
        >>> typical_filter(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), mass=0.5)
        tensor([[-0.6931, -1.2040,    -inf,    -inf]])
    """
    mass = validate_mass(mass)
    min_tokens_to_keep = validate_min_tokens_to_keep(min_tokens_to_keep)
    if (
        isinstance(filter_value, bool)
        or not isinstance(filter_value, (int, float))
        or math.isnan(filter_value)
    ):
        raise ValueError(f"`filter_value` must be a float (usually -inf), got {filter_value!r}.")
    if not isinstance(scores, Tensor) or scores.ndim not in (1, 2):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"`scores` must be a tensor of shape (batch, vocab) or (vocab,), got {shape}.")
    if mass >= 1.0:
        return scores
    rows = scores if scores.ndim == 2 else scores[None]
    if uses_triton(rows):
        out = _triton_module().typical_filter_triton(rows, mass, min_tokens_to_keep, float(filter_value))
    else:
        check_logits(rows, "scores")
        out = reference.typical_filter_torch(rows, mass, min_tokens_to_keep, float(filter_value))
    return out if scores.ndim == 2 else out[0]


def cfg_typical_sample(
    cond_logits: Tensor,
    uncond_logits: Tensor | None,
    scale: float | Tensor,
    mass: float,
    *,
    temperature: float = 1.0,
    min_tokens_to_keep: int = 1,
    seed: int | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from the typical set of the CFG-guided, tempered distribution.

    Steps: ``l = cfg_log_probs(cond, uncond, scale)`` (``cond`` itself at ``scale == 1`` or when
    ``uncond_logits`` is None), ``z = l / temperature``, the typical filter of ``z`` with
    ``mass`` (1 = off) and ``min_tokens_to_keep``, then a draw from the renormalised kept
    probabilities: the order of transformers' CFG processor, temperature and typical warpers.
    On CUDA this is one Triton kernel that writes nothing vocabulary-sized.

    Randomness is one uniform per row (an inverse-CDF draw): from ``seed`` (an int gives row
    ``b`` the seed ``seed + b``; a (B,) integer tensor gives one seed per row), else from
    ``generator``, else from torch's global generator. A seed gives the same tokens on CPU
    and CUDA (up to float rounding at a boundary). In a decoding loop pass a different seed
    per step (or a generator), or every step reuses the same uniforms.

    Returns a (B,) LongTensor. Raises ``ValueError`` for bad arguments, NaN / +inf logits, and
    rows whose guided logits are all ``-inf``.

    Example:
        >>> import torch
        >>> from samplers.kernels import cfg_typical_sample
        >>> cond = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
        >>> cfg_typical_sample(cond, torch.zeros(2, 3), 1.5, mass=0.9, seed=0).shape
        torch.Size([2])
    """
    mass = validate_mass(mass)
    temperature = validate_temperature(temperature)
    min_tokens_to_keep = validate_min_tokens_to_keep(min_tokens_to_keep)
    if not isinstance(cond_logits, Tensor) or cond_logits.ndim != 2:
        raise ValueError("`cond_logits` must be a tensor of shape (batch, vocab).")
    if uncond_logits is not None and (
        not isinstance(uncond_logits, Tensor) or uncond_logits.shape != cond_logits.shape
    ):
        raise ValueError("`uncond_logits` must be None or a tensor of the shape of `cond_logits`.")
    validate_scale(scale, "scale")
    if isinstance(scale, Tensor) and scale.numel() not in (1, cond_logits.shape[0]):
        raise ValueError(
            f"`scale` as a tensor must have shape ({cond_logits.shape[0]},), got {tuple(scale.shape)}."
        )
    uniforms = row_uniforms(cond_logits.shape[0], cond_logits.device, seed=seed, generator=generator)
    guided = uncond_logits is not None and (isinstance(scale, Tensor) or scale != 1)
    tensors = (cond_logits, uncond_logits) if guided else (cond_logits,)
    if uses_triton(*tensors):
        return _triton_module().cfg_typical_sample_triton(
            cond_logits,
            uncond_logits if guided else None,
            scale,
            mass,
            temperature=temperature,
            min_tokens_to_keep=min_tokens_to_keep,
            uniforms=uniforms,
        )
    check_logits(cond_logits, "cond_logits")
    if guided:
        check_logits(uncond_logits, "uncond_logits")
    return reference.cfg_typical_sample_torch(
        cond_logits,
        uncond_logits if guided else None,
        scale,
        mass,
        temperature=temperature,
        min_tokens_to_keep=min_tokens_to_keep,
        uniforms=uniforms,
    )
