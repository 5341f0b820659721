"""Similarity-adaptive CFG (ComfyUI's Mahiro)."""

from __future__ import annotations

from torch import Tensor

from guidance import ops
from guidance.guiders.base import GUIDER_SPACES, Guider
from guidance.schedules import Schedule
from guidance.validation import check_choice


class SimilarityAdaptive(Guider):
    """ComfyUI's ``Mahiro``: mixes CFG with ``w c`` by how well the guided and unconditional directions agree.

    See :func:`guidance.ops.mahiro`. ``convention="per_sample"`` (default) measures the agreement
    per sample; ``"comfyui"`` over the whole batch, as the node does (equal for a batch of one).
    ComfyUI applies it to denoised predictions, hence ``space="x0"`` by default. No paper. Two
    network evaluations per step.

    Example:
        >>> import torch
        >>> from guidance.guiders import SimilarityAdaptive
        >>> c = torch.tensor([[[1.0], [2.0]]])
        >>> SimilarityAdaptive(3.0, space="prediction")(c, c, step=0)  # u = c: k = 4, plain CFG (= c)
        tensor([[[1.],
                 [2.]]])
    """

    def __init__(
        self,
        scale: float | Schedule = 7.5,
        convention: str = "per_sample",
        *,
        space: str = "x0",
        rescale: float = 0.0,
    ):
        super().__init__(scale, rescale=rescale)
        self.convention = check_choice(convention, "convention", ops.MAHIRO_CONVENTIONS)
        self.space = check_choice(space, "space", GUIDER_SPACES)

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.mahiro(cond, uncond, scale, convention=self.convention)

    def _config(self) -> str:
        return f"{super()._config()}, convention={self.convention!r}, space={self.space!r}"
