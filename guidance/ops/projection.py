"""Splitting a vector into its parts parallel and orthogonal to another, per sample, in float64."""

from __future__ import annotations

import torch
from torch import Tensor

from guidance.ops._common import _float64_device, _sample_dims


def project(
    vector: Tensor, onto: Tensor, dims: int | tuple[int, ...] | list[int] | None = None
) -> tuple[Tensor, Tensor]:
    """``(parallel, orthogonal)`` parts of ``vector`` with respect to ``onto``, per sample.

    ``parallel = <v, o_hat> o_hat`` with ``o_hat = o / ||o||`` over ``dims`` (default: every
    non-batch dimension), computed in float64 (on the CPU for devices without float64) and returned
    in ``vector``'s dtype; ``orthogonal = v - parallel``. A zero ``onto`` gives ``parallel = 0``.

    Example:
        >>> import torch
        >>> from guidance.ops import project
        >>> project(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]]))
        (tensor([[1., 0.]]), tensor([[0., 1.]]))
    """
    dims_ = _sample_dims(vector, dims)
    device64 = _float64_device(vector)
    v = vector.to(device=device64, dtype=torch.float64)
    unit = torch.nn.functional.normalize(onto.to(device=device64, dtype=torch.float64), dim=dims_)
    parallel = (v * unit).sum(dim=dims_, keepdim=True) * unit
    orthogonal = v - parallel
    return (
        parallel.to(device=vector.device, dtype=vector.dtype),
        orthogonal.to(device=vector.device, dtype=vector.dtype),
    )
