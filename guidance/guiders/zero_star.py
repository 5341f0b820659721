"""CFG-Zero*."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance import ops
from guidance.guiders.base import Dims, Guider
from guidance.schedules import Schedule
from guidance.validation import check_range


class CFGZeroStar(Guider):
    """CFG-Zero* (Fan et al. 2025): optimised unconditional scale, and zero output for the first steps.

    For ``step < zero_init_steps`` the output is ``zeros_like(cond)`` whatever the scale (as in
    diffusers' ``ClassifierFreeZeroStarGuidance``), and ``uncond`` is not needed there.
    ``use_zero_star=False`` keeps the zero-init but combines with plain CFG.

    Example:
        >>> import torch
        >>> from guidance.guiders import CFGZeroStar
        >>> g = CFGZeroStar(2.0, zero_init_steps=1)
        >>> c, u = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 0.0]])
        >>> g(c, None, step=0), g(c, u, step=1)
        (tensor([[0., 0.]]), tensor([[2., 2.]]))
    """

    def __init__(
        self,
        scale: float | Schedule = 7.5,
        zero_init_steps: int = 0,
        use_zero_star: bool = True,
        *,
        eps: float = 1e-8,
        rescale: float = 0.0,
        dims: Dims = None,
    ):
        super().__init__(scale, rescale=rescale, dims=dims)
        if isinstance(zero_init_steps, bool) or not isinstance(zero_init_steps, int) or zero_init_steps < 0:
            raise ValueError(f"`zero_init_steps` must be an integer >= 0, got {zero_init_steps!r}.")
        self.zero_init_steps = zero_init_steps
        self.use_zero_star = bool(use_zero_star)
        self.eps = check_range(eps, "eps", 0.0, math.inf)

    def needs_uncond(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> bool:
        return step >= self.zero_init_steps and super().needs_uncond(step, num_steps, sigma)

    def __call__(
        self,
        cond: Tensor,
        uncond: Tensor | None,
        *,
        step: int,
        num_steps: int | None = None,
        sigma: float | None = None,
        **extra: Tensor,
    ) -> Tensor:
        if step < self.zero_init_steps:
            self._begin_step(step)
            return torch.zeros_like(cond)
        return super().__call__(cond, uncond, step=step, num_steps=num_steps, sigma=sigma, **extra)

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        if not self.use_zero_star:
            return ops.cfg(cond, uncond, scale)
        return ops.cfg_zero_star(cond, uncond, scale, eps=self.eps, dims=self.dims)

    def _config(self) -> str:
        return (
            f"{super()._config()}, zero_init_steps={self.zero_init_steps}, use_zero_star={self.use_zero_star}"
        )
