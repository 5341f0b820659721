"""CFG-Zero*."""

from __future__ import annotations

import torch
from torch import Tensor

from guidance import ops
from guidance.guiders.base import Dims, Guider
from guidance.ops.zero_star import check_eps, zero_init
from guidance.schedules import Schedule
from guidance.validation import check_bool, check_int


class CFGZeroStar(Guider):
    """CFG-Zero* (Fan et al. 2025): optimised unconditional scale, and zero output for the first steps.

    For ``step < zero_init_steps`` the output is ``zeros_like(cond)`` whatever the scale (as in
    diffusers' ``ClassifierFreeZeroStarGuidance``; the rule is :func:`guidance.ops.zero_star.zero_init`),
    and ``uncond`` is not needed there. ``use_zero_star=False`` keeps the zero-init but combines
    with plain CFG.

    Args:
        scale (float | Schedule): the guidance scale ``w`` (finite) or a schedule (see :class:`Guider`).
        zero_init_steps (int): how many first steps output zeros, an integer ``>= 0``.
        use_zero_star (bool): use the optimised scale ``alpha`` (``False``: plain CFG after zero-init).
        eps (float): ``alpha``'s denominator offset, a finite number ``>= 0``.
        rescale (float): guidance rescale ``phi`` in ``[0, 1]`` (0: off).
        dims (int | tuple[int, ...] | None): per-sample reduction dimensions; ``None``: all non-batch ones.

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
        self.zero_init_steps = check_int(zero_init_steps, "zero_init_steps", minimum=0)
        self.use_zero_star = check_bool(use_zero_star, "use_zero_star")
        self.eps = check_eps(eps)

    def in_zero_init(self, step: int) -> bool:
        """Whether ``step`` is one of the zero-init steps (output zeros, no ``uncond`` needed)."""
        return zero_init(step, self.zero_init_steps)

    def needs_uncond(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> bool:
        return not self.in_zero_init(step) and super().needs_uncond(step, num_steps, sigma)

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
        if self.in_zero_init(step):
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
