"""Perturbation guiders as diffusers guider components for modular pipelines (PAG, SLG, SEG).

Diffusers' modular denoise loop asks the guider for its batches (``prepare_inputs``), and around
each batch's forward calls ``prepare_models(denoiser)`` / ``cleanup_models(denoiser)``. These
components return ``[cond, uncond, cond]`` (the last one perturbed; ``uncond`` only where CFG is
on, the perturbed batch only inside the perturbation window), enter the guider's hook
(:mod:`guidance.diffusion.perturbations`) in ``prepare_models`` for the perturbed batch and leave
it in ``cleanup_models``. A hook left open by a forward that raised is closed at the next
``set_state`` or ``prepare_models``. The combine is the wrapped guider's
(:class:`~guidance.guiders.PerturbedAttention` etc.), ``convention`` included.

Example:
    >>> import torch
    >>> from guidance.diffusion.modular_perturbed import PAGGuidance
    >>> guider = PAGGuidance(guidance_scale=5.0, perturbed_guidance_scale=3.0, layers="transformer_blocks.0")
    >>> guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    >>> guider.num_conditions
    3
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from guidance.guiders import PerturbedAttention, PerturbedGuider, SkipLayer, SmoothedEnergy

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

__all__ = ["PerturbedGuiderComponent", "PAGGuidance", "SLGGuidance", "SEGGuidance"]

_TUPLE_INDEX = {"pred_cond": 0, "pred_uncond": 1, "pred_cond_perturbed": 0}


class PerturbedGuiderComponent(BaseGuidance):
    """Shared plumbing: ``self.guider`` is a :class:`~guidance.guiders.PerturbedGuider`."""

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_perturbed"]

    def _setup(self, guider: PerturbedGuider, start: float, stop: float, enabled: bool) -> None:
        super().__init__(start, stop, enabled)
        self.guider = guider
        self._open: Any = None

    def _names(self) -> list[str]:
        if not self._enabled:
            return ["pred_cond"]
        step, n = (0 if self._step is None else self._step), self._num_inference_steps
        names = ["pred_cond"]
        if self.guider.needs_uncond(step, n, None):
            names.append("pred_uncond")
        if self._step is not None and self.guider.perturbed_scale_at(step, n, None) != 0.0:
            names.append("pred_cond_perturbed")
        return names

    @property
    def num_conditions(self) -> int:
        return len(self._names())

    @property
    def is_conditional(self) -> bool:
        names = self._names()
        index = max(self._count_prepared - 1, 0)
        return index >= len(names) or names[index] != "pred_uncond"

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        self._close()
        if step == 0:
            self.guider.reset()
        super().set_state(step, num_inference_steps, timestep)

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[BlockState]:
        return [self._prepare_batch(data, _TUPLE_INDEX[name], name) for name in self._names()]

    def prepare_inputs_from_block_state(
        self, data: BlockState, input_fields: dict[str, str | tuple[str, str]]
    ) -> list[BlockState]:
        return [
            self._prepare_batch_from_block_state(input_fields, data, _TUPLE_INDEX[name], name)
            for name in self._names()
        ]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._close()
        self._count_prepared += 1
        names = self._names()
        if self._count_prepared <= len(names) and names[self._count_prepared - 1] == "pred_cond_perturbed":
            self._open = self.guider.hook.apply(denoiser, None)
            self._open.__enter__()

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self._close()

    def _close(self) -> None:
        context, self._open = self._open, None
        if context is not None:
            context.__exit__(None, None, None)

    def forward(
        self,
        pred_cond: torch.Tensor,
        pred_uncond: torch.Tensor | None = None,
        pred_cond_perturbed: torch.Tensor | None = None,
    ) -> GuiderOutput:
        if not self._enabled:
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        step = 0 if self._step is None else self._step
        pred = self.guider(pred_cond, pred_uncond, step=step, num_steps=self._num_inference_steps,
                           perturbed=pred_cond_perturbed)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


class PAGGuidance(PerturbedGuiderComponent):
    """:class:`~guidance.guiders.PerturbedAttention` (PAG) as a modular guider component.

    Args:
        guidance_scale (float): CFG scale (1: off). perturbed_guidance_scale (float): PAG scale (0: off).
        layers (str | list[str]): self-attention layers made identity (``"transformer_blocks.1"`` for SD3).
        perturbed_start, perturbed_stop (float): PAG window as fractions of the run (default every step).
        convention (str): ``"paper"`` or ``"diffusers"``. guidance_rescale (float): rescale in [0, 1].
        start, stop, enabled: diffusers' guider switches (whole guidance on/off).
    """

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, perturbed_guidance_scale: float = 3.0,
                 layers: str | list[str] = "mid", perturbed_start: float = 0.0, perturbed_stop: float = 1.0,
                 convention: str = "paper", guidance_rescale: float = 0.0,
                 start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        guider = PerturbedAttention(guidance_scale, perturbed_guidance_scale, layers=layers, start=perturbed_start,
                                    stop=perturbed_stop, convention=convention, rescale=guidance_rescale)
        self._setup(guider, start, stop, enabled)


class SLGGuidance(PerturbedGuiderComponent):
    """:class:`~guidance.guiders.SkipLayer` (SLG) as a modular guider component; arguments as :class:`PAGGuidance`
    (``layers`` required: the skipped blocks; window default 0.01-0.2)."""

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, perturbed_guidance_scale: float = 2.8,
                 layers: str | list[str] | None = None, perturbed_start: float = 0.01, perturbed_stop: float = 0.2,
                 convention: str = "paper", guidance_rescale: float = 0.0,
                 start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        guider = SkipLayer(guidance_scale, perturbed_guidance_scale, layers=layers, start=perturbed_start,
                           stop=perturbed_stop, convention=convention, rescale=guidance_rescale)
        self._setup(guider, start, stop, enabled)


class SEGGuidance(PerturbedGuiderComponent):
    """:class:`~guidance.guiders.SmoothedEnergy` (SEG) as a modular guider component; ``sigma`` is the query blur."""

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, perturbed_guidance_scale: float = 3.0,
                 layers: str | list[str] = "mid", sigma: float = 9999.0, perturbed_start: float = 0.0,
                 perturbed_stop: float = 1.0, convention: str = "paper", guidance_rescale: float = 0.0,
                 start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        guider = SmoothedEnergy(guidance_scale, perturbed_guidance_scale, layers=layers, sigma=sigma,
                                start=perturbed_start, stop=perturbed_stop, convention=convention,
                                rescale=guidance_rescale)
        self._setup(guider, start, stop, enabled)
