"""Adaptive projected guidance, APG (Sadat et al., ICLR 2025)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance.ops._common import (
    Scale,
    _as_batch_scale,
    _check_pair,
    _check_scale,
    _float64_scalars,
    _is_one,
    _keep_cond_where_one,
    _sample_dims,
    _saturate,
    _vector_batch,
    _work_dtype,
)
from guidance.tensors import pow2_scale
from guidance.validation import check_choice, check_finite, check_range, check_tensor

APG_CONVENTIONS = ("paper", "diffusers", "comfyui")


def check_apg_args(
    eta: float, norm_threshold: float | None, convention: str, momentum: float | None = None
) -> tuple[float, float | None]:
    """The one check of APG's settings, shared by :func:`apg` and the ``APG`` guider.

    Args:
        eta (float): weight of the parallel component, a finite real number.
        norm_threshold (float | None): ``None`` or a finite number ``>= 0`` (``0``/``None``: no threshold).
        convention (str): one of :data:`APG_CONVENTIONS`.
        momentum (float | None): ``None`` or a number in ``[-1, 1]`` (``[0, 1]`` for ``"comfyui"``).

    Returns:
        tuple[float, float | None]: ``eta`` and ``norm_threshold`` as floats (``None`` when disabled).

    Example:
        >>> from guidance.ops.apg import check_apg_args
        >>> check_apg_args(1, 0, "diffusers")
        (1.0, None)
    """
    check_choice(convention, "convention", APG_CONVENTIONS)
    eta = check_finite(eta, "eta")
    if norm_threshold is not None:
        norm_threshold = check_range(norm_threshold, "norm_threshold", 0.0, math.inf, hi_open=True) or None
    if momentum is not None:
        low = 0.0 if convention == "comfyui" else -1.0
        check_range(momentum, "momentum", low, 1.0)
    return eta, norm_threshold


class MomentumBuffer:
    """APG's running average of the guidance direction: ``avg = d + momentum * avg_prev``.

    The first update returns ``d``. Call :meth:`reset` at the start of every sampling run (the
    guiders in :mod:`guidance.guiders` do). The paper uses negative momentum (e.g. ``-0.5``);
    ComfyUI's APG node takes ``[0, 1]``; diffusers accepts any value.

    Args:
        momentum (float): the momentum, a number in ``[-1, 1]``.

    Example:
        >>> import torch
        >>> from guidance.ops import MomentumBuffer
        >>> buf = MomentumBuffer(-0.5)
        >>> buf.update(torch.tensor([2.0])), buf.update(torch.tensor([2.0]))
        (tensor([2.]), tensor([1.]))
    """

    def __init__(self, momentum: float):
        self.momentum = check_range(momentum, "momentum", -1.0, 1.0)
        self.running_average: Tensor | None = None

    def update(self, direction: Tensor) -> Tensor:
        """Fold ``direction`` (a floating tensor of the shape of the previous ones) into the average."""
        check_tensor(direction, "direction", floating=True)
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
        """Forget the running average (start of a sampling run)."""
        self.running_average = None

    def __repr__(self) -> str:
        shape = None if self.running_average is None else tuple(self.running_average.shape)
        return f"MomentumBuffer(momentum={self.momentum}, running_average_shape={shape})"


def _cap_norm(direction: Tensor, norm_threshold: float, dims: list[int]) -> Tensor:
    """``d * min(1, r / ||d||)`` with diffusers' float operations; the norm is computed on a
    power-of-two-scaled copy, so it neither overflows nor underflows."""
    scaled, exponent = pow2_scale(direction, dims)
    scaled_norm = scaled.norm(p=2, dim=dims, keepdim=True)
    norm = torch.ldexp(scaled_norm, exponent)
    factor = torch.minimum(torch.ones_like(norm), norm_threshold / norm)
    # A norm beyond the dtype's range: r / ||d|| from the scaled norm instead of r / inf = 0.
    factor = torch.where(torch.isfinite(norm), factor, torch.ldexp(norm_threshold / scaled_norm, -exponent))
    return direction * factor


def _project(direction: Tensor, cond: Tensor, dims: list[int]) -> tuple[Tensor, Tensor]:
    """``d`` split into its part along ``c`` and the rest, in float64 (as diffusers does). ``c`` is
    normalised after power-of-two scaling and without an epsilon, so tiny or huge ``c`` keep their
    direction; ``c = 0`` has no direction and everything is orthogonal."""
    d64, c64 = _float64_scalars(direction), _float64_scalars(cond)
    c64, _ = pow2_scale(c64, dims)
    norm = c64.norm(p=2, dim=dims, keepdim=True)
    c_hat = torch.where(norm > 0, c64 / norm, torch.zeros_like(c64))
    parallel = (d64 * c_hat).sum(dim=dims, keepdim=True) * c_hat
    orthogonal = d64 - parallel
    back = {"device": direction.device, "dtype": direction.dtype}
    return parallel.to(**back), orthogonal.to(**back)


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

    Args:
        cond (Tensor): the conditional prediction, floating point, batch first (``(B,)``: one value per sample).
        uncond (Tensor): the unconditional prediction, same shape.
        scale (float | Tensor): ``w``, a finite real number or a tensor of shape ``()``, ``(1,)``, ``(B,)``.
        eta (float): weight of the parallel component, a finite real number.
        momentum_buffer (MomentumBuffer | None): running average of ``d`` (momentum in ``[0, 1]`` for
            ``"comfyui"``), updated in place; untouched at ``scale == 1``.
        norm_threshold (float | None): ``r``, a finite number ``>= 0``; ``None`` or ``0`` disables it.
        convention (str): ``"paper"``, ``"diffusers"`` or ``"comfyui"``.
        dims (int | tuple[int, ...] | None): per-sample reduction dimensions; ``None``: all non-batch ones.

    Returns:
        Tensor: ``cond`` itself at ``scale == 1``; otherwise in ``cond``'s dtype, computed in float32
        at least (float64 for the projection). Bit-identical to diffusers' ``normalized_guidance``
        in float32 (``"diffusers"``, ``"comfyui"``).

    Edge cases: norms are scale-invariant (power-of-two scaling, no epsilon), so inputs of size
    1e-13 or 1e20 give the same directions as inputs of size 1; ``c = 0`` (no direction to project
    on) makes all of ``d`` orthogonal; ``d = 0`` gives ``cond`` (paper, comfyui) or ``uncond``
    (diffusers). Values are not inspected (no device sync);
    a result beyond the dtype's range saturates to ``+-finfo.max``.

    Example:
        >>> import torch
        >>> from guidance.ops import apg
        >>> c, u = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])
        >>> apg(c, u, 3.0)  # d = (1, 0): only its part orthogonal to c is kept, eta = 0
        tensor([[2., 0.]])
        >>> torch.round(apg(c * 1e-13, u * 1e-13, 3.0) * 1e13, decimals=4)  # the same at any magnitude
        tensor([[2., 0.]])
    """
    momentum = None if momentum_buffer is None else getattr(momentum_buffer, "momentum", None)
    if momentum_buffer is not None and not isinstance(momentum_buffer, MomentumBuffer):
        raise TypeError(f"`momentum_buffer` must be a MomentumBuffer or None, got {type(momentum_buffer).__name__}.")
    eta, norm_threshold = check_apg_args(eta, norm_threshold, convention, momentum)
    _check_pair(cond, uncond, min_ndim=1)
    scale = _check_scale(scale, cond)
    dims_ = _sample_dims(cond, dims)
    if _is_one(scale):
        return cond
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)

    direction = c - u
    if momentum_buffer is not None:
        direction = momentum_buffer.update(direction)
    if norm_threshold:
        direction = _cap_norm(direction, norm_threshold, dims_)
    parallel, orthogonal = _project(direction, c, dims_)
    update = orthogonal + eta * parallel

    w = _as_batch_scale(scale, c)
    if convention == "paper":
        guided = c + (w - 1) * update
    elif convention == "diffusers":
        guided = u + w * update
    else:
        guided = c + w * update
    return _keep_cond_where_one(scale, cond, _saturate(guided.to(cond.dtype), cond, uncond))
