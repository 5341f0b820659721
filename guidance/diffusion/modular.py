"""Our guiders as diffusers guider components, for modular pipelines.

Each class here is a ``diffusers.guiders.BaseGuidance`` (a ``ConfigMixin``) wrapping one guider of
:mod:`guidance.guiders`, so it drops into any modular pipeline with
``pipe.update_components(guider=...)`` and saves/loads with ``save_pretrained``/``from_pretrained``.
The formula lives in :mod:`guidance.ops`; these classes only translate diffusers' guider protocol
(``set_state`` / ``prepare_inputs`` / ``forward``) to ours.

* Scales may be a :mod:`guidance.schedules` schedule (``schedule=``; not saved in the config,
  ``new()`` carries it over). Guidance-off steps (scale 1, or outside ``[start, stop)``) report
  ``num_conditions == 1``, so the pipeline skips the unconditional forward pass.
* Modular guider components only see the denoiser's predictions (diffusers passes nothing else to
  ``forward``), so every operator acts on the raw prediction (eps, v or flow velocity); APG's paper
  form on x0 needs the classic-pipeline wrapper. The schedule gets ``sigma=None``.
* Perp-Neg needs a third (empty-prompt) prediction that the modular blocks do not provide, so it
  has no component here.

Example:
    >>> import torch
    >>> from guidance.diffusion.modular import APGGuidance
    >>> from guidance.schedules import Linear
    >>> guider = APGGuidance(schedule=Linear(1.0, 7.0), momentum=-0.5, norm_threshold=15.0)
    >>> guider.set_state(step=1, num_inference_steps=3, timestep=torch.tensor(500))
    >>> guider.num_conditions
    2
    >>> out = guider.forward(torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))
    >>> out.pred.shape
    torch.Size([1, 4, 8, 8])

    With a modular pipeline (``pipe`` from e.g. ``StableDiffusion3T2ICoreDenoiseStep().init_pipeline()``):
    ``pipe.update_components(guider=APGGuidance(guidance_scale=7.5))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from guidance.guiders import APG, CFG, BetaCFG, CFGZeroStar, Guider
from guidance.schedules import Constant, Schedule
from guidance.validation import check_finite

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

__all__ = ["GuiderComponent", "CFGGuidance", "APGGuidance", "CFGZeroStarGuidance", "BetaCFGGuidance"]


class GuiderComponent(BaseGuidance):
    """Shared diffusers-guider plumbing around one :class:`guidance.guiders.Guider` (``self.guider``).

    Subclasses register their config with ``@register_to_config`` and implement :meth:`_build_guider`.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]
    ignore_for_config = ["schedule"]

    def _setup(
        self, guidance_scale: float, schedule: Schedule | None, start: float, stop: float, enabled: bool
    ):
        super().__init__(start, stop, enabled)
        self.guidance_scale = check_finite(guidance_scale, "guidance_scale")
        self.schedule = schedule
        self.guider: Guider = self._build_guider(schedule if schedule is not None else self.guidance_scale)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        raise NotImplementedError

    def new(self, **kwargs: Any) -> GuiderComponent:
        """A copy with some config values changed; ``schedule=`` may be passed too (else it is carried over)."""
        schedule = kwargs.pop("schedule", self.schedule)
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        config.update(kwargs)
        return self.__class__(**config, schedule=schedule)

    # -- when guidance runs -------------------------------------------------------------------------

    def _in_range(self) -> bool:
        if self._num_inference_steps is None or self._step is None:
            return True
        start = int(self._start * self._num_inference_steps)
        stop = int(self._stop * self._num_inference_steps)
        return start <= self._step < stop

    def _is_guidance_enabled(self) -> bool:
        if not self._enabled or not self._in_range():
            return False
        if self._step is None:
            # Asked before the loop (e.g. whether to encode negative prompts): off only if constant 1.
            schedule = self.guider.schedule
            return not (isinstance(schedule, Constant) and schedule.scale == 1.0)
        return self.guider.needs_uncond(self._step, self._num_inference_steps, None)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_guidance_enabled() else 1

    # -- diffusers guider protocol ------------------------------------------------------------------

    def _maybe_reset(self) -> None:
        if self._step == 0:
            self.guider.reset()

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[BlockState]:
        self._maybe_reset()
        tuple_indices = [0] if self.num_conditions == 1 else [0, 1]
        return [
            self._prepare_batch(data, index, name)
            for index, name in zip(tuple_indices, self._input_predictions[: len(tuple_indices)], strict=True)
        ]

    def prepare_inputs_from_block_state(
        self, data: BlockState, input_fields: dict[str, str | tuple[str, str]]
    ) -> list[BlockState]:
        self._maybe_reset()
        tuple_indices = [0] if self.num_conditions == 1 else [0, 1]
        return [
            self._prepare_batch_from_block_state(input_fields, data, index, name)
            for index, name in zip(tuple_indices, self._input_predictions[: len(tuple_indices)], strict=True)
        ]

    def _guidance_off(self, pred_cond: torch.Tensor) -> torch.Tensor:
        return pred_cond

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if not self._enabled or not self._in_range():
            pred = self._guidance_off(pred_cond)
        else:
            step = 0 if self._step is None else self._step
            uncond = pred_uncond if self._is_guidance_enabled() else None
            pred = self.guider(pred_cond, uncond, step=step, num_steps=self._num_inference_steps)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        state["guider"] = repr(self.guider)
        return state


class CFGGuidance(GuiderComponent):
    """Classifier-free guidance (with optional ``guidance_rescale`` and a scale schedule) as a diffusers guider.

    Gives the same numbers as diffusers' ``ClassifierFreeGuidance`` (same float operations).

    Example:
        >>> import torch
        >>> from guidance.diffusion.modular import CFGGuidance
        >>> g = CFGGuidance(guidance_scale=3.0)
        >>> g.forward(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])).pred
        tensor([[ 4., -2.]])
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        schedule: Schedule | None = None,
    ):
        self.guidance_rescale = guidance_rescale
        self._setup(guidance_scale, schedule, start, stop, enabled)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        return CFG(scale, rescale=self.guidance_rescale)


class APGGuidance(GuiderComponent):
    """Adaptive Projected Guidance as a diffusers guider, acting on the raw prediction.

    ``convention="diffusers", eta=1.0, norm_threshold=15.0`` reproduces diffusers'
    ``AdaptiveProjectedGuidance`` defaults; ``"comfyui"`` its ``use_original_formulation=True``
    (and ComfyUI's node); ``"paper"`` (default) is ``c + (w - 1)(d_perp + eta d_par)``, here on
    eps/v rather than x0 (see the module docstring). ``momentum`` resets at step 0 of each run.

    Example:
        >>> import torch
        >>> from guidance.diffusion.modular import APGGuidance
        >>> g = APGGuidance(guidance_scale=3.0, eta=1.0, convention="diffusers")
        >>> g.forward(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])).pred
        tensor([[3., 1.]])
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        momentum: float | None = None,
        norm_threshold: float | None = None,
        convention: str = "paper",
        dims: int | list[int] | None = None,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        schedule: Schedule | None = None,
    ):
        self.eta, self.momentum, self.norm_threshold = eta, momentum, norm_threshold
        self.convention = convention
        self.dims = tuple(dims) if isinstance(dims, (list, tuple)) else dims
        self.guidance_rescale = guidance_rescale
        self._setup(guidance_scale, schedule, start, stop, enabled)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        return APG(
            scale,
            eta=self.eta,
            momentum=self.momentum,
            norm_threshold=self.norm_threshold,
            convention=self.convention,
            dims=self.dims,
            space="prediction",
            rescale=self.guidance_rescale,
        )


class CFGZeroStarGuidance(GuiderComponent):
    """CFG-Zero* as a diffusers guider: same numbers as diffusers' ``ClassifierFreeZeroStarGuidance``.

    ``zero_init_steps`` steps output zeros (and skip the unconditional pass) even where the scale is 1
    or outside ``[start, stop)``, as diffusers does.

    Example:
        >>> import torch
        >>> from guidance.diffusion.modular import CFGZeroStarGuidance
        >>> g = CFGZeroStarGuidance(guidance_scale=2.0, zero_init_steps=1)
        >>> g.set_state(step=1, num_inference_steps=4, timestep=torch.tensor(10))
        >>> g.forward(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 0.0]])).pred
        tensor([[2., 2.]])
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        zero_init_steps: int = 0,
        use_zero_star: bool = True,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        schedule: Schedule | None = None,
    ):
        self.zero_init_steps, self.use_zero_star = zero_init_steps, use_zero_star
        self.guidance_rescale = guidance_rescale
        self._setup(guidance_scale, schedule, start, stop, enabled)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        return CFGZeroStar(
            scale,
            zero_init_steps=self.zero_init_steps,
            use_zero_star=self.use_zero_star,
            rescale=self.guidance_rescale,
        )

    def _guidance_off(self, pred_cond: torch.Tensor) -> torch.Tensor:
        if self._enabled and self._step is not None and self._step < self.zero_init_steps:
            return torch.zeros_like(pred_cond)
        return pred_cond


class BetaCFGGuidance(GuiderComponent):
    """beta-CFG as a diffusers guider: ``u + w beta_pdf(t; a, b) (c - u) / ||c - u||^gamma``.

    Example:
        >>> import torch
        >>> from guidance.diffusion.modular import BetaCFGGuidance
        >>> g = BetaCFGGuidance(guidance_scale=7.5)
        >>> g.set_state(step=1, num_inference_steps=3, timestep=torch.tensor(500))
        >>> round(g.guider.scale_at(1, 3), 4)
        11.25
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        a: float = 2.0,
        b: float = 3.0,
        gamma: float = 1.0,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        schedule: Schedule | None = None,
    ):
        self.a, self.b, self.gamma = a, b, gamma
        self.guidance_rescale = guidance_rescale
        self._setup(guidance_scale, schedule, start, stop, enabled)

    def _build_guider(self, scale: float | Schedule) -> Guider:
        return BetaCFG(scale, a=self.a, b=self.b, gamma=self.gamma, rescale=self.guidance_rescale)
