"""Perp-Neg."""

from __future__ import annotations

import math

from torch import Tensor

from guidance import ops
from guidance.guiders.base import Dims, Guider
from guidance.schedules import Schedule
from guidance.validation import check_range


class PerpNeg(Guider):
    """Perp-Neg (Armandpour et al. 2023): ``cond`` = positive prompt, ``uncond`` = empty prompt, ``negative=`` in extra.

    Needs three predictions per step (``needs_negative`` is True). See :func:`guidance.ops.perp_neg`.

    Example:
        >>> import torch
        >>> from guidance.guiders import PerpNeg
        >>> c, u, n = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])
        >>> PerpNeg(2.0)(c, u, negative=n, step=0)
        tensor([[ 2., -2.]])
    """

    needs_negative = True

    def __init__(
        self,
        scale: float | Schedule = 7.5,
        neg_scale: float = 1.0,
        *,
        rescale: float = 0.0,
        dims: Dims = None,
    ):
        super().__init__(scale, rescale=rescale, dims=dims)
        self.neg_scale = check_range(neg_scale, "neg_scale", 0.0, math.inf)
        if math.isinf(self.neg_scale):
            raise ValueError(f"`neg_scale` must be finite, got {neg_scale!r}.")

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        negative = extra.get("negative")
        if negative is None:
            raise ValueError("PerpNeg needs the negative-prompt prediction: pass `negative=` to the guider.")
        return ops.perp_neg(cond, uncond, negative, scale, self.neg_scale, dims=self.dims)

    def _config(self) -> str:
        return f"{super()._config()}, neg_scale={self.neg_scale}"
