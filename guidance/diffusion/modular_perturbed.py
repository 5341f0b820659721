"""Perturbation guiders as diffusers guider components for modular pipelines (PAG, SLG, SEG; NAG).

Diffusers' modular denoise loop asks the guider for its batches (``prepare_inputs``), and around
each batch's forward calls ``prepare_models(denoiser)`` / ``cleanup_models(denoiser)``. These
components return ``[cond, uncond, cond]`` (the last one perturbed; ``uncond`` only where CFG is
on, the perturbed batch only inside the perturbation window), enter the guider's hook
(:mod:`guidance.perturbations`) in ``prepare_models`` for the perturbed batch and leave
it in ``cleanup_models``. A hook left open by a forward that raised is closed at the next
``set_state`` or ``prepare_models``. The combine is the wrapped guider's
(:class:`~guidance.guiders.PerturbedAttention` etc.), ``convention`` included.

:class:`NAGGuidance` has no perturbed batch: it returns ``[cond]`` (``[cond, uncond]`` with CFG)
and installs the NAG cross-attention hook for the ``cond`` batch. Its negative context is the
one set on the component (``component.negative = embeds``) or else the pipeline's negative
prompt embeddings of the step (the unconditional entry of ``prompt_embeds`` /
``encoder_hidden_states``, which text-encoder steps compute only when CFG is on).

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

from guidance.guiders import (
    NormalizedAttention,
    PerturbedAttention,
    PerturbedGuider,
    SkipLayer,
    SmoothedEnergy,
)

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

__all__ = ["PerturbedGuiderComponent", "PAGGuidance", "SLGGuidance", "SEGGuidance", "NAGGuidance"]

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


_CONTEXT_FIELDS = ("encoder_hidden_states", "prompt_embeds")


class NAGGuidance(PerturbedGuiderComponent):
    """:class:`~guidance.guiders.NormalizedAttention` (NAG) as a modular guider component.

    Args:
        guidance_scale (float): CFG scale (1, the default: NAG alone, one batch per step).
        nag_scale (float): NAG scale (1: off). nag_tau (float), nag_alpha (float), nag_norm (str):
            see :func:`~guidance.ops.normalized_attention_guidance`.
        layers (str | list[str] | None): cross-attention layers (``None``: all).
        nag_start, nag_stop (float): NAG window as fractions of the run. guidance_rescale (float): CFG rescale.
        start, stop, enabled: diffusers' guider switches (whole guidance on/off).

    Set ``component.negative`` (text embeddings, or ``prompt_inputs(...)``) to choose the NAG
    negative; otherwise the pipeline's negative prompt embeddings are used (module docstring).
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(self, guidance_scale: float = 1.0, nag_scale: float = 5.0, nag_tau: float = 2.5,
                 nag_alpha: float = 0.25, nag_norm: str = "l1", layers: str | list[str] | None = None,
                 nag_start: float = 0.0, nag_stop: float = 1.0, guidance_rescale: float = 0.0,
                 start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        guider = NormalizedAttention(guidance_scale, nag_scale, tau=nag_tau, alpha=nag_alpha, norm=nag_norm,
                                     layers=layers, start=nag_start, stop=nag_stop, rescale=guidance_rescale)
        self._setup(guider, start, stop, enabled)
        self._explicit = False

    @property
    def negative(self) -> torch.Tensor | None:
        """The NAG negative context set on the component (``None``: the pipeline's negative embeddings)."""
        return self.guider.negative if self._explicit else None

    @negative.setter
    def negative(self, value: Any) -> None:
        self.guider.negative = value
        self._explicit = value is not None

    def _names(self) -> list[str]:
        step = 0 if self._step is None else self._step
        if self._enabled and self.guider.needs_uncond(step, self._num_inference_steps, None):
            return ["pred_cond", "pred_uncond"]
        return ["pred_cond"]

    def _nag_on(self) -> bool:
        return self._enabled and self._step is not None and (
            self.guider.nag_scale_at(self._step, self._num_inference_steps, None) != 1.0
        )

    def _pipeline_negative(self, value: Any) -> None:
        if not self._explicit and isinstance(value, torch.Tensor):
            self.guider.negative = value

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[BlockState]:
        for field in _CONTEXT_FIELDS:
            if isinstance(data.get(field), tuple) and len(data[field]) > 1:
                self._pipeline_negative(data[field][1])
                break
        return super().prepare_inputs(data)

    def prepare_inputs_from_block_state(
        self, data: BlockState, input_fields: dict[str, str | tuple[str, str]]
    ) -> list[BlockState]:
        for field in _CONTEXT_FIELDS:
            names = input_fields.get(field)
            if isinstance(names, tuple) and len(names) > 1:
                self._pipeline_negative(getattr(data, names[1], None))
                break
        return super().prepare_inputs_from_block_state(data, input_fields)

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._close()
        self._count_prepared += 1
        if self._count_prepared == 1 and self._nag_on():  # the cond batch comes first
            cond = self.guider.branches(self._step, self._num_inference_steps)[0]
            self._open = cond.hook.apply(denoiser, None)
            self._open.__enter__()

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if not self._enabled:
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        step = 0 if self._step is None else self._step
        pred = self.guider(pred_cond, pred_uncond, step=step, num_steps=self._num_inference_steps)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
