"""Adaptive projected mix guidance: CFG for the first steps, APG afterwards (HunyuanImage-2.1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance import ops
from guidance.guiders.base import Dims, Guider
from guidance.schedules import Schedule, as_schedule
from guidance.validation import check_choice, check_finite, check_int, check_range


class APGMix(Guider):
    """CFG while ``step <= apg_start_step``, then APG (:func:`guidance.ops.apg`) with its own scale.

    The momentum buffer accumulates ``c - u`` from the first guided step on, also during the CFG
    phase, so APG starts from a warm running average. ``scale`` (CFG, also the on/off switch: at 1
    the output is ``cond`` in both phases) and ``apg_scale`` may be schedules; where ``apg_scale``
    is 1 the step stays CFG. Defaults are diffusers' ``AdaptiveProjectedMixGuidance`` signature
    (``3.5, 10.0, momentum -0.5, norm threshold 10, eta 0, start step 5``), whose numbers it
    reproduces with ``convention="diffusers"`` (default: there is no paper for the mix; pass
    ``"paper"`` for APG's paper form ``c + (w - 1)(...)`` in the APG phase). Acts on the raw
    prediction (the recipe of HunyuanImage-2.1, a flow model). Two network evaluations per step.

    Example:
        >>> import torch
        >>> from guidance.guiders import APGMix
        >>> g = APGMix(3.0, apg_scale=5.0, apg_start_step=0)
        >>> c, u = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])
        >>> g(c, u, step=0)  # CFG phase
        tensor([[3., 1.]])
        >>> g(c, u, step=1)  # APG phase: running average (c - u) - 0.5 (c - u), its part orthogonal to c
        tensor([[ 1.2500, -0.2500]])
    """

    def __init__(
        self,
        scale: float | Schedule = 3.5,
        apg_scale: float | Schedule = 10.0,
        momentum: float | None = -0.5,
        norm_threshold: float | None = 10.0,
        eta: float = 0.0,
        apg_start_step: int = 5,
        convention: str = "diffusers",
        *,
        rescale: float = 0.0,
        dims: Dims = None,
    ):
        super().__init__(scale, rescale=rescale, dims=dims)
        self.apg_schedule = as_schedule(apg_scale)
        self.convention = check_choice(convention, "convention", ops.APG_CONVENTIONS)
        self.eta = check_finite(eta, "eta")
        if norm_threshold is not None:
            check_range(norm_threshold, "norm_threshold", 0.0, math.inf, hi_open=True)
        self.norm_threshold = norm_threshold
        self.apg_start_step = check_int(apg_start_step, "apg_start_step", minimum=-1)
        self.momentum = momentum
        self.momentum_buffer = None if momentum is None else ops.MomentumBuffer(momentum)

    def reset(self) -> None:
        super().reset()
        if self.momentum_buffer is not None:
            self.momentum_buffer.reset()

    def apg_scale_at(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        """The APG phase's scale at ``step``."""
        return float(self.apg_schedule(step, num_steps, sigma))

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
        self._apg_scale = self.apg_scale_at(step, num_steps, sigma)
        return super().__call__(cond, uncond, step=step, num_steps=num_steps, sigma=sigma, **extra)

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        if step > self.apg_start_step and self._apg_scale != 1.0:
            return ops.apg(
                cond,
                uncond,
                self._apg_scale,
                eta=self.eta,
                momentum_buffer=self.momentum_buffer,
                norm_threshold=self.norm_threshold,
                convention=self.convention,
                dims=self.dims,
            )
        if self.momentum_buffer is not None:
            work = torch.promote_types(cond.dtype, torch.float32)  # as ops.apg computes its direction
            self.momentum_buffer.update(cond.to(work) - uncond.to(work))
        return ops.cfg(cond, uncond, scale)

    def _config(self) -> str:
        return (
            f"{super()._config()}, apg_scale={self.apg_schedule!r}, momentum={self.momentum}, "
            f"norm_threshold={self.norm_threshold}, eta={self.eta}, apg_start_step={self.apg_start_step}, "
            f"convention={self.convention!r}"
        )
