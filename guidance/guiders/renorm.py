"""Norm-limited CFG: CFG-Renorm / CFG-Trunc (Lumina-Image 2.0) and ComfyUI's CFGNorm."""

from __future__ import annotations

import math

from torch import Tensor

from guidance import ops
from guidance.guiders.base import GUIDER_SPACES, Dims, Guider
from guidance.schedules import Schedule
from guidance.validation import check_choice, check_range


class RenormCFG(Guider):
    """CFG-Renorm and CFG-Trunc (Lumina-Image 2.0, arXiv 2503.21758).

    Renorm: ``g = cfg(c, u, w)``, then ``g <- g min(1, renorm ||c|| / ||g||)`` per sample
    (:func:`guidance.ops.cfg_renorm`; ``renorm=0`` disables it). Trunc: guidance stops (one network
    evaluation per step) once ``(step + 1) / num_steps > trunc`` (``trunc=1``: never, the default of
    Lumina and ComfyUI), as ``Lumina2Pipeline``'s ``cfg_trunc_ratio``.

    ``convention="paper"`` (default) is Lumina's official code, on the raw prediction (flow
    velocity); ``space="x0"`` gives ComfyUI's ``RenormCFG`` node (the same arithmetic on denoised
    predictions). ``convention="diffusers"`` reproduces ``Lumina2Pipeline(cfg_normalization=True)``:
    always ``g ||c|| / ||g||`` with norms over the last dim (``renorm`` must be > 0).

    Example:
        >>> import torch
        >>> from guidance.guiders import RenormCFG
        >>> g = RenormCFG(4.0, renorm=1.0, trunc=0.5)
        >>> g(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2), step=0, num_steps=4)  # ||g|| capped at ||c||
        tensor([[3., 4.]])
        >>> g.needs_uncond(step=2, num_steps=4)  # truncated: (2 + 1) / 4 > 0.5
        False
    """

    def __init__(
        self,
        scale: float | Schedule = 4.0,
        renorm: float = 1.0,
        trunc: float = 1.0,
        convention: str = "paper",
        *,
        space: str = "prediction",
        rescale: float = 0.0,
        dims: Dims = None,
    ):
        super().__init__(scale, rescale=rescale, dims=dims)
        self.renorm = check_range(renorm, "renorm", 0.0, math.inf, hi_open=True)
        self.trunc = check_range(trunc, "trunc", 0.0, 1.0)
        self.convention = check_choice(convention, "convention", ops.RENORM_CONVENTIONS)
        if convention == "diffusers" and self.renorm == 0:
            raise ValueError("`renorm` must be > 0 with convention='diffusers' (it always renormalises).")
        self.space = check_choice(space, "space", GUIDER_SPACES)

    def scale_at(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        if self.trunc < 1.0:
            if num_steps is None:
                raise ValueError("RenormCFG with `trunc` < 1 needs `num_steps` (the number of sampling steps).")
            if (step + 1) / num_steps > self.trunc:
                return 1.0
        return super().scale_at(step, num_steps, sigma)

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.cfg_renorm(cond, uncond, scale, rho=self.renorm, convention=self.convention, dims=self.dims)

    def _config(self) -> str:
        return (
            f"{super()._config()}, renorm={self.renorm}, trunc={self.trunc}, convention={self.convention!r}, "
            f"space={self.space!r}"
        )


class CFGNorm(Guider):
    """ComfyUI's ``CFGNorm``: CFG whose output is shrunk, per position, to at most the conditional norm.

    ``g = cfg(c, u, w)``, ``k = clamp(||c|| / (||g|| + 1e-8), 0, 1)`` with norms over the channel
    dim, output ``g k strength`` (:func:`guidance.ops.cfg_norm`). ComfyUI applies it to denoised
    predictions, hence ``space="x0"`` by default (``"prediction"`` acts on eps/v directly; Qwen-Image's
    ``true_cfg_scale`` renormalisation is the same idea on the flow velocity). No paper. Two network
    evaluations per step.

    Example:
        >>> import torch
        >>> from guidance.guiders import CFGNorm
        >>> g = CFGNorm(2.0, space="prediction")
        >>> g(torch.tensor([[[3.0], [4.0]]]), torch.zeros(1, 2, 1), step=0)
        tensor([[[3.],
                 [4.]]])
    """

    def __init__(
        self,
        scale: float | Schedule = 7.5,
        strength: float = 1.0,
        *,
        space: str = "x0",
        rescale: float = 0.0,
    ):
        super().__init__(scale, rescale=rescale)
        self.strength = check_range(strength, "strength", 0.0, math.inf, hi_open=True)
        self.space = check_choice(space, "space", GUIDER_SPACES)

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.cfg_norm(cond, uncond, scale, strength=self.strength)

    def _config(self) -> str:
        return f"{super()._config()}, strength={self.strength}, space={self.space!r}"
