"""Tensor helpers shared by the core: per-sample broadcast, work dtype, scale-invariant reductions.

One home for each (the operators, :mod:`guidance.spaces`, :mod:`guidance.adaptive` and the
adapters use them):

* :func:`per_sample`: a ``(B,)`` tensor viewed as ``(B, 1, ..., 1)`` so it broadcasts per sample.
* :func:`work_dtype`: the dtype reductions run in (float32 at least).
* :func:`saturate`: overflow from finite inputs becomes ``+-finfo.max``, not ``+-inf``.
* :func:`pow2_scale`: per-sample power-of-two scaling, so norms, dot products and standard
  deviations neither overflow (values of size 1e20 in float32) nor underflow (1e-30). Scaling by a
  power of two is exact, so wherever the unscaled computation neither overflows nor underflows the
  scaled one gives the same bits.

Example:
    >>> import torch
    >>> from guidance.tensors import per_sample, scaled_norm
    >>> per_sample(torch.tensor([1.0, 2.0]), torch.zeros(2, 3, 4)).shape
    torch.Size([2, 1, 1])
    >>> x = torch.full((1, 4), 1e20)
    >>> x.norm(dim=1), scaled_norm(x, [1])[:, 0]
    (tensor([inf]), tensor([2.0000e+20]))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "per_sample", "work_dtype", "pow2_scale", "pow2_exponent", "scaled_norm", "float64_device", "saturate",
    "surely_finite",
]


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """``values`` of ``numel`` 1 or ``B`` viewed as ``(B, 1, ..., 1)`` (``like.ndim`` dimensions).

    Args:
        values (Tensor): one value, or one value per sample (shape ``()``, ``(1,)``, ``(B,)``,
            optionally followed by singleton dimensions). Dtype and device are kept.
        like (Tensor): the batch-first tensor to broadcast against (any number of dimensions;
            for a 0-d ``like`` the result is 0-d).

    Returns:
        Tensor: a view of ``values`` that broadcasts against ``like`` one value per sample.

    Example:
        >>> import torch
        >>> from guidance.tensors import per_sample
        >>> per_sample(torch.tensor([1.0, 2.0]), torch.zeros(2, 3)).tolist()
        [[1.0], [2.0]]
    """
    if like.ndim == 0:
        return values.reshape(())
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def work_dtype(x: Tensor) -> torch.dtype:
    """The dtype the core computes reductions in: ``x.dtype`` promoted to float32 at least.

    Example:
        >>> import torch
        >>> from guidance.tensors import work_dtype
        >>> work_dtype(torch.zeros(1, dtype=torch.float16)), work_dtype(torch.zeros(1, dtype=torch.float64))
        (torch.float32, torch.float64)
    """
    return torch.promote_types(x.dtype, torch.float32)


def float64_device(x: Tensor) -> torch.device:
    """Where float64 math on ``x`` can run: its own device, or the CPU for MPS/NPU (no float64 there).

    Args:
        x (Tensor): any tensor.

    Example:
        >>> import torch
        >>> from guidance.tensors import float64_device
        >>> float64_device(torch.zeros(1))
        device(type='cpu')
    """
    return torch.device("cpu") if x.device.type in {"mps", "npu"} else x.device


def pow2_scale(x: Tensor, dims: list[int]) -> tuple[Tensor, Tensor]:
    """Per-sample ``(x * 2**-e, e)`` with ``2**e`` near ``max |x|`` over ``dims`` (kept as size-1 dims).

    Args:
        x (Tensor): a floating-point tensor (float32 or float64: the work dtype).
        dims (list[int]): the per-sample reduction dimensions (non-empty).

    Returns:
        tuple[Tensor, Tensor]: the scaled tensor, whose largest magnitude per sample lies in
        ``[0.5, 1)`` (0 for an all-zero sample), and the integer exponents ``e`` (int32), clamped
        so that ``2**-e`` is a normal number of ``x.dtype``. Non-finite samples are left unscaled.

    Example:
        >>> import torch
        >>> from guidance.tensors import pow2_scale
        >>> scaled, e = pow2_scale(torch.tensor([[3.0, -6.0]]), [1])
        >>> scaled, e
        (tensor([[ 0.3750, -0.7500]]), tensor([[3]], dtype=torch.int32))
    """
    exponent = pow2_exponent(x, dims)
    return torch.ldexp(x, -exponent), exponent


def pow2_exponent(x: Tensor, dims: list[int]) -> Tensor:
    """Per-sample integer ``e`` (int32, size-1 ``dims`` kept) with ``max |x| / 2**e`` in ``[0.5, 1)``.

    Clamped so that ``2**-e`` is a normal number of ``x.dtype``; 0 for all-zero or non-finite samples.

    Args:
        x (Tensor): a float32 or float64 tensor.
        dims (list[int]): the per-sample reduction dimensions (non-empty).

    Example:
        >>> import torch
        >>> from guidance.tensors import pow2_exponent
        >>> pow2_exponent(torch.tensor([[3.0, -6.0], [0.0, 0.0]]), [1]).tolist()
        [[3], [0]]
    """
    amax = x.detach().abs().amax(dim=dims, keepdim=True)
    _, exponent = torch.frexp(amax)
    limit = -int(math.log2(torch.finfo(x.dtype).tiny))  # 2**-e stays a normal number
    return torch.where(torch.isfinite(amax), exponent, torch.zeros_like(exponent)).clamp(-limit, limit)


def scaled_norm(x: Tensor, dims: list[int]) -> Tensor:
    """Per-sample L2 norm over ``dims`` (kept as size-1 dims) that does not overflow or underflow
    in the intermediate sum of squares; bit-identical to ``x.norm(p=2, dim=dims)`` where that one
    neither overflows nor underflows. The result itself overflows to ``inf`` only when the norm
    exceeds the dtype's range.

    Args:
        x (Tensor): a float32 or float64 tensor.
        dims (list[int]): the per-sample reduction dimensions (non-empty).

    Example:
        >>> import torch
        >>> from guidance.tensors import scaled_norm
        >>> scaled_norm(torch.tensor([[3e-30, 4e-30]]), [1])
        tensor([[5.0000e-30]])
    """
    scaled, exponent = pow2_scale(x, dims)
    return torch.ldexp(scaled.norm(p=2, dim=dims, keepdim=True), exponent)


def saturate(out: Tensor, *inputs: Tensor) -> Tensor:
    """Entries of ``out`` that overflowed to ``+-inf`` although every input there is finite become
    ``+-finfo(out.dtype).max``.

    The exact result is beyond the dtype's range there; the largest finite number of the right sign
    keeps its direction without feeding ``inf - inf`` (NaN) to whatever comes next. Where an input is
    infinite the output is left as computed. No device sync.

    Args:
        out (Tensor): a floating-point result.
        *inputs (Tensor): the tensors it was computed from, broadcastable to ``out``'s shape.

    Example:
        >>> import torch
        >>> from guidance.tensors import saturate
        >>> x = torch.tensor([6e4, float("inf")], dtype=torch.float16)
        >>> saturate(x * 2, x)
        tensor([65504.,    inf], dtype=torch.float16)
    """
    overflow = torch.isinf(out)
    for x in inputs:
        overflow = overflow & torch.isfinite(x)
    limit = torch.finfo(out.dtype).max
    return torch.where(overflow, torch.copysign(torch.full_like(out, limit), out), out)


def surely_finite(*tensors: Tensor) -> bool:
    """True when every entry of every tensor is finite, judged from their sums (one pass each, one sync).

    A NaN or infinite entry makes a sum NaN or infinite, so True is always right; False may also
    come from finite entries whose sum overflows. Use it to pick a fast path whose slow
    alternative is correct for any input (several times faster than ``torch.isfinite(x).all()``
    on the CPU).

    Args:
        *tensors (Tensor): floating-point tensors of any shapes.

    Example:
        >>> import torch
        >>> from guidance.tensors import surely_finite
        >>> surely_finite(torch.tensor([1.0, -2.0]), torch.tensor([3e38, 3e38]))  # finite, but the sum overflows
        False
        >>> surely_finite(torch.tensor([1.0, 2.0]))
        True
    """
    sums = [x.sum(dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None) for x in tensors]
    return bool(torch.isfinite(torch.stack([total.to(sums[0].dtype) for total in sums])).all())
