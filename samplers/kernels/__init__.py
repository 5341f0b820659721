"""Fused CFG / typical-sampling kernels and the dispatcher that picks their implementation.

Every function here runs the Triton kernels (:mod:`samplers.kernels.triton_kernels`, one
program per row, and :mod:`samplers.kernels.triton_split`, long rows split across programs)
when its input is a CUDA tensor of float16/bfloat16/float32, Triton imports and the environment
variable ``GUIDANCE_DISABLE_TRITON`` is not ``1``; otherwise the PyTorch path of
:mod:`samplers.kernels.reference` (the same semantics, any device, no Triton needed).
Nothing here imports transformers or triton at import time.

* :func:`cfg_log_softmax`: the log-prob CFG combine of :func:`guidance.ops.cfg_log_probs`;
* :func:`typical_filter`: locally typical filter, transformers' ``TypicalLogitsWarper``
  semantics with an exact (float64) boundary, sort-free;
* :func:`cfg_typical_sample`: CFG + temperature + typical filter + draw, fused on CUDA;
* :func:`fused_warpers_supported` / :class:`FusedSampling`: whether a list of logits warpers
  can be replaced by :func:`cfg_typical_sample`, and the call that does it.

Contracts shared by the three operators (the same on the PyTorch and the Triton paths):

* arguments are validated before any work (``TypeError`` for a wrong type, ``ValueError`` for a
  value out of range, naming the argument); Python scalars cost nothing to check;
* ``-inf`` marks a masked token: it stays ``-inf`` (or is never drawn). A row that is entirely
  ``-inf`` comes back unchanged from :func:`typical_filter` and has no token to draw in
  :func:`cfg_typical_sample`;
* NaN and ``+inf`` logits are errors (a ``+inf`` logit is not a probability: mask the other
  tokens with ``-inf`` to force one). With ``check_finite=True`` (the default) they raise
  ``ValueError``: on the PyTorch path before any work; on the Triton path the kernel detects
  them in its first pass and the wrapper reads one int32 flag per row afterwards (one small
  device-to-host read, which waits for the kernel). ``check_finite=False`` never reads back:
  such rows come out all-NaN (:func:`typical_filter`, :func:`cfg_log_softmax`) or as token
  ``-1`` (:func:`cfg_typical_sample`, also for rows with nothing to draw), on every path;
* a guidance scale of exactly 1 (a number, or a row of a per-row tensor) returns
  ``cond_logits`` bit for bit; ``mass == 1`` returns ``scores`` itself. Both are unchecked
  no-ops.

Speed (``benchmarks/typical_sampling.py``; results in ``benchmarks/results/``): on CPU the
PyTorch path is 3-7x faster than transformers' sort-based ``TypicalLogitsWarper`` at every
size tried (32k-256k tokens, batch 1-256). On CUDA, small batches with long rows take the
split-row kernels (see :func:`split_chunks`), large batches the one-program-per-row kernels.
"""

from samplers.kernels.chunking import split_chunks
from samplers.kernels.dispatch import (
    DISABLE_TRITON_ENV,
    cfg_log_softmax,
    cfg_typical_sample,
    raise_for_missing_tokens,
    triton_available,
    typical_filter,
    uses_triton,
)
from samplers.kernels.fused import FusedSampling, fused_warpers_supported

__all__ = [
    "DISABLE_TRITON_ENV",
    "FusedSampling",
    "cfg_log_softmax",
    "cfg_typical_sample",
    "fused_warpers_supported",
    "raise_for_missing_tokens",
    "split_chunks",
    "triton_available",
    "typical_filter",
    "uses_triton",
]
