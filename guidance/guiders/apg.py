"""Adaptive projected guidance."""

from __future__ import annotations

import math

from torch import Tensor

from guidance import ops
from guidance.guiders.base import GUIDER_SPACES, Dims, Guider
from guidance.schedules import Schedule
from guidance.validation import check_finite, check_range


class APG(Guider):
    """Adaptive Projected Guidance (Sadat et al., ICLR 2025); see :func:`guidance.ops.apg` for the math.

    ``convention="paper"`` (default) acts on denoised predictions (``space="x0"``) with
    ``c + (w - 1)(d_perp + eta d_par)``; ``"diffusers"`` reproduces diffusers'
    ``AdaptiveProjectedGuidance`` (on the raw prediction, ``u + w (...)``; pass ``eta=1.0,
    norm_threshold=15.0`` for its defaults); ``"comfyui"`` reproduces ComfyUI's APG node
    (``c + w (...)`` on denoised predictions, momentum in ``[0, 1]``). ``space`` overrides where it acts.
    ``momentum=beta`` keeps a running average of the guidance direction, reset by :meth:`reset`.

    Example:
        >>> import torch
        >>> from guidance.guiders import APG
        >>> apg = APG(3.0, convention="diffusers", eta=1.0)
        >>> apg(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]]), step=0)  # eta = 1: plain CFG
        tensor([[3., 1.]])
    """

    def __init__(
        self,
        scale: float | Schedule = 7.5,
        eta: float = 0.0,
        momentum: float | None = None,
        norm_threshold: float | None = None,
        convention: str = "paper",
        dims: Dims = None,
        *,
        space: str | None = None,
        rescale: float = 0.0,
    ):
        super().__init__(scale, rescale=rescale, dims=dims)
        if convention not in ops.APG_CONVENTIONS:
            raise ValueError(f"`convention` must be one of {ops.APG_CONVENTIONS}, got {convention!r}.")
        self.convention = convention
        self.eta = check_finite(eta, "eta")
        if norm_threshold is not None:
            check_range(norm_threshold, "norm_threshold", 0.0, math.inf)
            if math.isinf(norm_threshold):
                raise ValueError(
                    f"`norm_threshold` must be finite (or None to disable), got {norm_threshold!r}."
                )
        self.norm_threshold = norm_threshold
        if momentum is not None and convention == "comfyui":
            check_range(momentum, "momentum", 0.0, 1.0)
        self.momentum = momentum
        self.momentum_buffer = None if momentum is None else ops.MomentumBuffer(momentum)
        if space is None:
            space = "prediction" if convention == "diffusers" else "x0"
        if space not in GUIDER_SPACES:
            raise ValueError(f"`space` must be one of {GUIDER_SPACES}, got {space!r}.")
        self.space = space

    def reset(self) -> None:
        super().reset()
        if self.momentum_buffer is not None:
            self.momentum_buffer.reset()

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.apg(
            cond,
            uncond,
            scale,
            eta=self.eta,
            momentum_buffer=self.momentum_buffer,
            norm_threshold=self.norm_threshold,
            convention=self.convention,
            dims=self.dims,
        )

    def _config(self) -> str:
        return (
            f"{super()._config()}, eta={self.eta}, momentum={self.momentum}, norm_threshold={self.norm_threshold}, "
            f"convention={self.convention!r}, space={self.space!r}"
        )
