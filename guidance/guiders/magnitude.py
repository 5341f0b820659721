"""Magnitude-aware guidance (MAMBO-G)."""

from __future__ import annotations

import math

from torch import Tensor

from guidance import ops
from guidance.guiders.base import Dims, Guider
from guidance.schedules import Schedule
from guidance.validation import check_range


class MagnitudeAware(Guider):
    """MAMBO-G (arXiv 2508.03442): the scale decays towards 1 where ``||c - u|| / ||u||`` is large.

    ``w_eff = 1 + (w - 1) exp(-alpha ||c - u|| / ||u||)`` per sample, ``g = u + w_eff (c - u)``
    (:func:`guidance.ops.mambo_g`). Defaults as diffusers' ``MagnitudeAwareGuidance``
    (``scale=10, alpha=8``), whose numbers it reproduces bit for bit in float32. Two network
    evaluations per step.

    Example:
        >>> import torch
        >>> from guidance.guiders import MagnitudeAware
        >>> c, u = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 5.0]])
        >>> MagnitudeAware(5.0, alpha=0.0)(c, u, step=0)  # alpha 0: CFG
        tensor([[15.,  0.]])
    """

    def __init__(
        self, scale: float | Schedule = 10.0, alpha: float = 8.0, *, rescale: float = 0.0, dims: Dims = None
    ):
        super().__init__(scale, rescale=rescale, dims=dims)
        self.alpha = check_range(alpha, "alpha", 0.0, math.inf, hi_open=True)

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.mambo_g(cond, uncond, scale, alpha=self.alpha, dims=self.dims)

    def _config(self) -> str:
        return f"{super()._config()}, alpha={self.alpha}"
