"""Adaptive projected guidance, APG (Sadat et al., ICLR 2025)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops._common import (
    Scale,
    _as_batch_scale,
    _check_pair,
    _float64_device,
    _is_one,
    _keep_cond_where_one,
    _sample_dims,
    _vector_batch,
    _work_dtype,
)
from guidance.validation import check_finite as _check_finite
from guidance.validation import check_range as _check_range

APG_CONVENTIONS = ("paper", "diffusers", "comfyui")


class MomentumBuffer:
    """APG's running average of the guidance direction: ``avg = d + momentum * avg_prev``.

    The first update returns ``d``. Call :meth:`reset` at the start of every sampling run (the
    guiders in :mod:`guidance.guiders` do). The paper uses negative momentum (e.g. ``-0.5``);
    ComfyUI's APG node takes ``[0, 1]``; diffusers accepts any value. Allowed here: ``[-1, 1]``.

    Example:
        >>> import torch
        >>> from guidance.ops import MomentumBuffer
        >>> buf = MomentumBuffer(-0.5)
        >>> buf.update(torch.tensor([2.0])), buf.update(torch.tensor([2.0]))
        (tensor([2.]), tensor([1.]))
    """

    def __init__(self, momentum: float):
        self.momentum = _check_range(momentum, "momentum", -1.0, 1.0)
        self.running_average: Tensor | None = None

    def update(self, direction: Tensor) -> Tensor:
        if self.running_average is None:
            self.running_average = direction
        else:
            if self.running_average.shape != direction.shape:
                raise ValueError(
                    f"MomentumBuffer holds a running average of shape {tuple(self.running_average.shape)} but got "
                    f"{tuple(direction.shape)}: call `reset()` at the start of each sampling run."
                )
            self.running_average = direction + self.momentum * self.running_average.to(direction.dtype)
        return self.running_average

    def reset(self) -> None:
        self.running_average = None

    def __repr__(self) -> str:
        shape = None if self.running_average is None else tuple(self.running_average.shape)
        return f"MomentumBuffer(momentum={self.momentum}, running_average_shape={shape})"


@_vector_batch
def apg(
    cond: Tensor,
    uncond: Tensor,
    scale: Scale,
    *,
    eta: float = 0.0,
    momentum_buffer: MomentumBuffer | None = None,
    norm_threshold: float | None = None,
    convention: str = "paper",
    dims: int | tuple[int, ...] | None = None,
) -> Tensor:
    """Adaptive Projected Guidance (Sadat et al., ICLR 2025).

    ``d = c - u``, optionally ``d = momentum_buffer.update(d)`` and ``d *= min(1, r / ||d||)``
    (``r = norm_threshold``); then ``d`` is split into ``d_par``, its projection on ``c`` (in float64),
    and ``d_perp = d - d_par``, and with ``update = d_perp + eta * d_par`` the result is

    * ``convention="paper"`` (default): ``c + (w - 1) * update``. The paper applies it to denoised (x0)
      predictions and recommends ``eta = 0``; use :mod:`guidance.spaces` (or the ``APG`` guider,
      which does it for you) to get there from eps or v.
    * ``"diffusers"``: ``u + w * update``, diffusers' ``AdaptiveProjectedGuidance`` (which applies it
      to eps/v directly; its defaults are ``eta=1``, ``norm_threshold=15``). Equals the paper only at ``eta=1``.
    * ``"comfyui"``: ``c + w * update``, ComfyUI's APG node (on denoised predictions, momentum in
      ``[0, 1]``); also diffusers' ``use_original_formulation=True``.

    Returns ``cond`` itself at ``scale == 1`` and leaves the momentum buffer untouched then.
    ``norm_threshold`` ``None`` or ``0`` disables the threshold. Zero vectors give no NaN.

    Example:
        >>> import torch
        >>> from guidance.ops import apg
        >>> c, u = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])
        >>> apg(c, u, 3.0)  # d = (1, 0): only its part orthogonal to c is kept, eta = 0
        tensor([[2., 0.]])
    """
    if convention not in APG_CONVENTIONS:
        raise ValueError(f"`convention` must be one of {APG_CONVENTIONS}, got {convention!r}.")
    eta = _check_finite(eta, "eta")
    if norm_threshold is not None:
        norm_threshold = _check_range(norm_threshold, "norm_threshold", 0.0, math.inf)
        if math.isinf(norm_threshold):
            raise ValueError(f"`norm_threshold` must be finite (or None to disable), got {norm_threshold!r}.")
    if momentum_buffer is not None and convention == "comfyui":
        _check_range(momentum_buffer.momentum, "momentum", 0.0, 1.0)
    _check_pair(cond, uncond)
    if _is_one(scale):
        return cond
    dims_ = _sample_dims(cond, dims)
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)

    direction = c - u
    if momentum_buffer is not None:
        direction = momentum_buffer.update(direction)
    if norm_threshold:
        norm = direction.norm(p=2, dim=dims_, keepdim=True)
        direction = direction * torch.minimum(torch.ones_like(norm), norm_threshold / norm)

    device64 = _float64_device(direction)
    d64 = direction.to(device=device64, dtype=torch.float64)
    c_hat = torch.nn.functional.normalize(c.to(device=device64, dtype=torch.float64), dim=dims_)
    parallel = (d64 * c_hat).sum(dim=dims_, keepdim=True) * c_hat
    orthogonal = d64 - parallel
    parallel = parallel.to(device=direction.device, dtype=dtype)
    orthogonal = orthogonal.to(device=direction.device, dtype=dtype)
    update = orthogonal + eta * parallel

    w = _as_batch_scale(scale, c)
    if convention == "paper":
        guided = c + (w - 1) * update
    elif convention == "diffusers":
        guided = u + w * update
    else:
        guided = c + w * update
    return _keep_cond_where_one(scale, cond, guided.to(cond.dtype))
