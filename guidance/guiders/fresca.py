"""FreSca: the guidance direction scaled per spatial frequency."""

from __future__ import annotations

from torch import Tensor

from guidance import ops
from guidance.guiders.base import Guider
from guidance.ops.fresca import _check_args
from guidance.schedules import Schedule


class FreSca(Guider):
    """FreSca (ComfyUI's ``FreSca`` node, after WikiChao/FreSca): ``g = u + w F(c - u)``.

    ``F`` multiplies the frequencies of ``c - u`` inside a centred box of half-width ``freq_cutoff``
    (FFT over the last two dims) by ``scale_low`` and the others by ``scale_high``
    (:func:`guidance.ops.fresca`). Defaults are the node's (``1.0, 1.25, 20``); the cutoff counts
    latent pixels, so small latents need a smaller one. Linear, so any prediction space gives the
    same result. ``convention="comfyui"`` reproduces the node's box for cutoffs above half the
    latent size (see :func:`guidance.ops.frequency_scale`). Two network evaluations per step.

    Example:
        >>> import torch
        >>> from guidance.guiders import CFG, FreSca
        >>> c, u = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        >>> torch.allclose(FreSca(3.0, scale_high=1.0)(c, u, step=0), CFG(3.0)(c, u, step=0), atol=1e-5)
        True
    """

    def __init__(
        self,
        scale: float | Schedule = 7.5,
        scale_low: float = 1.0,
        scale_high: float = 1.25,
        freq_cutoff: int = 20,
        convention: str = "clamped",
        *,
        rescale: float = 0.0,
    ):
        super().__init__(scale, rescale=rescale)
        self.scale_low, self.scale_high, self.freq_cutoff = _check_args(scale_low, scale_high, freq_cutoff, convention)
        self.convention = convention

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.fresca(
            cond,
            uncond,
            scale,
            scale_low=self.scale_low,
            scale_high=self.scale_high,
            freq_cutoff=self.freq_cutoff,
            convention=self.convention,
        )

    def _config(self) -> str:
        return (
            f"{super()._config()}, scale_low={self.scale_low}, scale_high={self.scale_high}, "
            f"freq_cutoff={self.freq_cutoff}, convention={self.convention!r}"
        )
