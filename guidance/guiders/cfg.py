"""Plain CFG and CFG with guidance rescale."""

from __future__ import annotations

from torch import Tensor

from guidance import ops
from guidance.guiders.base import Dims, Guider
from guidance.schedules import Schedule


class CFG(Guider):
    """Classifier-free guidance ``u + w (c - u)``, with optional guidance rescale (``rescale=phi``).

    Same float operations as diffusers' pipelines and ``ClassifierFreeGuidance``.

    Example:
        >>> import torch
        >>> from guidance.guiders import CFG
        >>> CFG(3.0)(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]]), step=0)
        tensor([[ 4., -2.]])
    """

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.cfg(cond, uncond, scale)


class RescaledCFG(CFG):
    """CFG with guidance rescale (Lin et al. 2024), ``phi = rescale = 0.7`` by default: diffusers' ``guidance_rescale``.

    Example:
        >>> import torch
        >>> from guidance.guiders import RescaledCFG
        >>> RescaledCFG(4.0, rescale=0.5)(torch.tensor([[1.0, -1.0]]), torch.zeros(1, 2), step=0)
        tensor([[ 2.5000, -2.5000]])
    """

    def __init__(self, scale: float | Schedule = 7.5, rescale: float = 0.7, *, dims: Dims = None):
        super().__init__(scale, rescale=rescale, dims=dims)
