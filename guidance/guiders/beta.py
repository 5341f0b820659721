"""Beta-CFG."""

from __future__ import annotations

import math

from torch import Tensor

from guidance import ops
from guidance.guiders.base import Dims, Guider
from guidance.schedules import BetaPdf, Schedule
from guidance.validation import check_range


class BetaCFG(Guider):
    """beta-CFG (Malarz et al.): ``u + w beta_pdf(t; a, b) (c - u) / ||c - u||^gamma``, ``t = step / (N - 1)``.

    A number ``scale`` becomes the schedule ``BetaPdf(scale, a, b)`` (so ``num_steps`` is needed);
    a schedule object is used as given (then ``a`` and ``b`` are unused). As in the authors' code,
    the weight is 0 at the first and last step for ``a, b > 1`` (the output is then ``uncond``).

    Example:
        >>> import torch
        >>> from guidance.guiders import BetaCFG
        >>> g = BetaCFG(7.5)
        >>> round(g.scale_at(1, 3), 4)  # 7.5 * beta_pdf(0.5; 2, 3)
        11.25
    """

    def __init__(
        self,
        scale: float | Schedule = 7.5,
        a: float = 2.0,
        b: float = 3.0,
        gamma: float = 1.0,
        *,
        rescale: float = 0.0,
        dims: Dims = None,
    ):
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            scale = BetaPdf(float(scale), a, b)
        super().__init__(scale, rescale=rescale, dims=dims)
        self.a, self.b = a, b
        self.gamma = check_range(gamma, "gamma", 0.0, math.inf)
        if math.isinf(self.gamma):
            raise ValueError(f"`gamma` must be finite, got {gamma!r}.")

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.beta_cfg(cond, uncond, scale, self.gamma, dims=self.dims)

    def _config(self) -> str:
        return f"{super()._config()}, gamma={self.gamma}"
