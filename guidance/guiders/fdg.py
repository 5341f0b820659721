"""Frequency-decoupled guidance (FDG)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from guidance import ops
from guidance.guiders.base import Guider
from guidance.schedules import Schedule, as_schedule
from guidance.validation import check_finite


class _AnyLevel:
    """The guider's overall scale: the first level scale that is not 1 (``1.0``: every level off)."""

    def __init__(self, levels: Sequence[Schedule]):
        self.levels = tuple(levels)

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        for schedule in self.levels:
            scale = float(schedule(step, num_steps, sigma))
            if scale != 1.0:
                return scale
        return 1.0

    def __repr__(self) -> str:
        return f"levels{list(self.levels)!r}"


class FrequencyDecoupled(Guider):
    """FDG (arXiv 2506.19713): CFG with its own scale on each band of a Laplacian pyramid.

    ``scales`` holds one scale (or schedule) per band, from the finest (high frequencies) to the
    coarsest (diffusers' order and default ``(10.0, 5.0)``; the paper's SDXL setting: ``w_high = 10``,
    ``w_low = 5``). ``parallel_weights`` (one per band, or one for all; ``None`` = 1) damps the part
    of each band's update parallel to the conditional band. See :func:`guidance.ops.fdg`. Guidance is
    off (``uncond`` not needed) at steps where every band's scale is 1. Needs ``(B, ..., H, W)``
    predictions (UNet latents; not packed token sequences). Two network evaluations per step.

    Example:
        >>> import torch
        >>> from guidance.guiders import FrequencyDecoupled
        >>> c, u = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
        >>> FrequencyDecoupled((1.0, 1.0))(c, u, step=0) is c
        True
        >>> FrequencyDecoupled((10.0, 5.0))(c, u, step=0).shape
        torch.Size([1, 4, 16, 16])
    """

    def __init__(
        self,
        scales: Sequence[float | Schedule] = (10.0, 5.0),
        parallel_weights: Sequence[float] | float | None = None,
        *,
        rescale: float = 0.0,
    ):
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
            raise ValueError(f"`scales` must be a non-empty sequence of scales or schedules, got {scales!r}.")
        self.level_schedules = tuple(as_schedule(s) for s in scales)
        super().__init__(_AnyLevel(self.level_schedules), rescale=rescale)
        if parallel_weights is not None:
            weights = parallel_weights if isinstance(parallel_weights, Sequence) else [parallel_weights]
            if len(weights) not in (1, len(scales)):
                raise ValueError(
                    f"`parallel_weights` must hold one weight per level ({len(scales)}) or one for all, "
                    f"got {len(weights)}."
                )
            for k, p in enumerate(weights):
                check_finite(p, f"parallel_weights[{k}]")
        self.parallel_weights = parallel_weights

    def level_scales(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> list[float]:
        """Every band's scale at ``step``, finest first."""
        return [float(s(step, num_steps, sigma)) for s in self.level_schedules]

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
        self._levels = self.level_scales(step, num_steps, sigma)
        return super().__call__(cond, uncond, step=step, num_steps=num_steps, sigma=sigma, **extra)

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        weights = self.parallel_weights
        if isinstance(weights, Sequence) and len(weights) == 1:
            weights = weights[0]
        return ops.fdg(cond, uncond, self._levels, parallel_weights=weights)

    def _config(self) -> str:
        return f"scales={list(self.level_schedules)!r}, parallel_weights={self.parallel_weights!r}" + (
            f", rescale={self.rescale}" if self.rescale else ""
        )
