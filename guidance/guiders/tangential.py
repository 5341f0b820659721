"""Tangential damping CFG (TCFG)."""

from __future__ import annotations

from torch import Tensor

from guidance import ops
from guidance.guiders.base import Guider


class TangentialCFG(Guider):
    """TCFG (CVPR 2025, arXiv 2503.18137): CFG against ``uncond`` with its tangential part removed.

    ``u`` is replaced by its projection on the top right-singular vector of ``[c; u]``
    (:func:`guidance.ops.tangential_damping`), then ``g = u' + w (c - u')``. Acts on the raw
    prediction, like diffusers' ``TangentialClassifierFreeGuidance`` (same defaults: ``scale=7.5``)
    and ComfyUI's ``TCFG`` node for eps and flow models. Two network evaluations per step.

    Example:
        >>> import torch
        >>> from guidance.guiders import TangentialCFG
        >>> c, u = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
        >>> TangentialCFG(3.0)(c, u, step=0)
        tensor([[ 0.6584, -1.4472]])
    """

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.tcfg(cond, uncond, scale)
