"""Adaptive projected guidance."""

from __future__ import annotations

from torch import Tensor

from guidance import ops
from guidance.guiders.base import GUIDER_SPACES, Dims, Guider
from guidance.ops.apg import check_apg_args
from guidance.schedules import Schedule
from guidance.validation import check_choice


class APG(Guider):
    """Adaptive Projected Guidance (Sadat et al., ICLR 2025); see :func:`guidance.ops.apg` for the math.

    ``convention="paper"`` (default) acts on denoised predictions (``space="x0"``) with
    ``c + (w - 1)(d_perp + eta d_par)``; ``"diffusers"`` reproduces diffusers'
    ``AdaptiveProjectedGuidance`` (on the raw prediction, ``u + w (...)``; pass ``eta=1.0,
    norm_threshold=15.0`` for its defaults); ``"comfyui"`` reproduces ComfyUI's APG node
    (``c + w (...)`` on denoised predictions, momentum in ``[0, 1]``).

    Args:
        scale (float | Schedule): the guidance scale ``w`` or a schedule (see :class:`Guider`).
        eta (float): weight of the parallel component, a finite real number.
        momentum (float | None): momentum of the running average of ``c - u`` in ``[-1, 1]``
            (``[0, 1]`` for ``"comfyui"``), reset by :meth:`reset`; ``None``: no momentum.
        norm_threshold (float | None): cap on ``||c - u||``, a finite number ``>= 0``; ``None``/``0``: none.
        convention (str): ``"paper"``, ``"diffusers"`` or ``"comfyui"``.
        dims (int | tuple[int, ...] | None): per-sample reduction dimensions; ``None``: all non-batch ones.
        space (str | None): ``"prediction"`` or ``"x0"``; ``None``: ``"prediction"`` for
            ``"diffusers"``, ``"x0"`` otherwise.
        rescale (float): guidance rescale ``phi`` in ``[0, 1]`` (0: off).

    Example:
        >>> import torch
        >>> from guidance.guiders import APG
        >>> apg = APG(3.0, convention="diffusers", eta=1.0)
        >>> apg(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]]), step=0)  # eta = 1: plain CFG
        tensor([[3., 1.]])
    """

    def __init__(
        self,
        scale: float | Schedule = 7.5,
        eta: float = 0.0,
        momentum: float | None = None,
        norm_threshold: float | None = None,
        convention: str = "paper",
        dims: Dims = None,
        *,
        space: str | None = None,
        rescale: float = 0.0,
    ):
        super().__init__(scale, rescale=rescale, dims=dims)
        self.eta, self.norm_threshold = check_apg_args(eta, norm_threshold, convention, momentum)
        self.convention = convention
        self.momentum = None if momentum is None else float(momentum)
        self.momentum_buffer = None if momentum is None else ops.MomentumBuffer(momentum)
        if space is None:
            space = "prediction" if convention == "diffusers" else "x0"
        self.space = check_choice(space, "space", GUIDER_SPACES)

    def reset(self) -> None:
        """Start of a sampling run: also clears the momentum buffer."""
        super().reset()
        if self.momentum_buffer is not None:
            self.momentum_buffer.reset()

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.apg(
            cond,
            uncond,
            scale,
            eta=self.eta,
            momentum_buffer=self.momentum_buffer,
            norm_threshold=self.norm_threshold,
            convention=self.convention,
            dims=self.dims,
        )

    def _config(self) -> str:
        return (
            f"{super()._config()}, eta={self.eta}, momentum={self.momentum}, norm_threshold={self.norm_threshold}, "
            f"convention={self.convention!r}, space={self.space!r}"
        )
