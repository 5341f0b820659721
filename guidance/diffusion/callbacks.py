"""``callback_on_step_end`` callbacks that steer a pipeline's own guidance scale.

These work with any pipeline that reads ``pipe._guidance_scale`` every step and decides
``do_classifier_free_guidance`` from it (StableDiffusion, SDXL, SD3, PixArt, the digits
pipeline, ...), without wrapping the denoiser. A callback runs after step ``i`` and so sets the
scale of step ``i + 1``; the first step runs at the ``guidance_scale`` passed to the pipeline.

When the scale drops to ``<= 1`` the pipeline stops building the ``[uncond, cond]`` batch, so
the callback also cuts the conditioning tensors it lists in ``tensor_inputs`` (``prompt_embeds``,
SDXL's ``add_text_embeds`` / ``add_time_ids``, SD3's ``pooled_prompt_embeds``) to their
conditional half. diffusers' ``SDCFGCutoffCallback`` keeps ``prompt_embeds[-1:]`` instead, the
last row, which is the conditional embedding only for batch 1 (with more rows the pipeline
fails with a shape error). :class:`ScheduleCallback` also restores the unconditional half when
its schedule turns guidance back on.

For exact per-step control (including the first step), per-sample decisions and skipped
unconditional evaluations at any scale, prefer :func:`guidance.diffusion.attach`.
"""

from __future__ import annotations

import warnings
from typing import Any

from diffusers.callbacks import PipelineCallback
from diffusers.configuration_utils import register_to_config
from torch import Tensor

from guidance.diffusion.schedulers import noise_level_at, schedule_sigma
from guidance.schedules import Schedule, as_schedule

__all__ = ["CONDITIONING_TENSOR_INPUTS", "CFGCutoffCallback", "ScheduleCallback", "conditioning_inputs"]

# Tensors that pipelines build as [uncond, cond] and return from callbacks.
CONDITIONING_TENSOR_INPUTS = ("prompt_embeds", "add_text_embeds", "add_time_ids", "pooled_prompt_embeds")


def conditioning_inputs(pipe: Any) -> list[str]:
    """The stacked conditioning tensors that ``pipe`` hands to step callbacks (``tensor_inputs`` for it)."""
    allowed = getattr(pipe, "_callback_tensor_inputs", None) or []
    names = [name for name in CONDITIONING_TENSOR_INPUTS if name in allowed]
    if not names:
        raise ValueError(
            f"{type(pipe).__name__} does not pass any of {CONDITIONING_TENSOR_INPUTS} to step callbacks "
            f"(its `_callback_tensor_inputs` are {allowed}); a callback cannot switch its guidance off."
        )
    return names


def _cond_half(value: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if value.shape[0] % 2:
        raise ValueError(f"`{name}` has {value.shape[0]} rows; expected a stacked [uncond, cond] batch.")
    half = value.shape[0] // 2
    return value[:half], value[half:]


class CFGCutoffCallback(PipelineCallback):
    """Turns guidance off after step ``int(num_timesteps * cutoff_step_ratio)`` (or ``cutoff_step_index``), for any batch size.

    The drop-in fix for diffusers' ``SDCFGCutoffCallback`` / ``SDXLCFGCutoffCallback`` /
    ``SD3CFGCutoffCallback``: same step rule and same ``pipe._guidance_scale = 0.0``, but the
    conditioning tensors keep their whole conditional half. ``tensor_inputs`` defaults to
    ``["prompt_embeds"]``; :meth:`for_pipeline` picks the right names for SDXL/SD3.

    Example:
        >>> from guidance.diffusion import CFGCutoffCallback
        >>> from guidance.diffusion.testing import tiny_stable_diffusion
        >>> pipe = tiny_stable_diffusion()
        >>> callback = CFGCutoffCallback.for_pipeline(pipe, cutoff_step_ratio=0.5)
        >>> out = pipe(["a cat", "a dog"], guidance_scale=5.0, num_inference_steps=4, height=16, width=16,
        ...            output_type="latent", callback_on_step_end=callback)
        >>> tuple(out.images.shape)
        (2, 4, 8, 8)
    """

    @register_to_config
    def __init__(
        self,
        cutoff_step_ratio: float | None = 1.0,
        cutoff_step_index: int | None = None,
        tensor_inputs: list[str] | tuple[str, ...] | None = None,
    ):
        if cutoff_step_index is not None and cutoff_step_ratio == 1.0:
            cutoff_step_ratio = None
        if isinstance(cutoff_step_ratio, int) and not isinstance(cutoff_step_ratio, bool):
            cutoff_step_ratio = float(cutoff_step_ratio)
        super().__init__(cutoff_step_ratio=cutoff_step_ratio, cutoff_step_index=cutoff_step_index)
        self._tensor_inputs = list(tensor_inputs) if tensor_inputs is not None else ["prompt_embeds"]

    @classmethod
    def for_pipeline(
        cls, pipe: Any, cutoff_step_ratio: float | None = 1.0, cutoff_step_index: int | None = None
    ) -> CFGCutoffCallback:
        return cls(cutoff_step_ratio, cutoff_step_index, tensor_inputs=conditioning_inputs(pipe))

    @property
    def tensor_inputs(self) -> list[str]:
        return self._tensor_inputs

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict) -> dict:
        ratio, index = self.config.cutoff_step_ratio, self.config.cutoff_step_index
        cutoff_step = index if index is not None else int(pipeline.num_timesteps * ratio)
        if step_index == cutoff_step and getattr(pipeline, "do_classifier_free_guidance", True):
            for name in self._tensor_inputs:
                callback_kwargs[name] = _cond_half(callback_kwargs[name], name)[1]
            pipeline._guidance_scale = 0.0
        return callback_kwargs


class ScheduleCallback(PipelineCallback):
    """Sets ``pipe._guidance_scale`` before every step from a schedule (:mod:`guidance.schedules`).

    The callback after step ``i`` sets ``schedule(i + 1, num_timesteps, sigma_{i+1})``. Where the
    schedule gives ``<= 1`` the pipeline runs the conditional batch only (saving the
    unconditional evaluations), and the unconditional half of the conditioning is kept aside and
    put back when the schedule rises above 1 again. Scales in ``(0, 1)`` (which a negative
    prompt can make meaningful) cannot be expressed through ``_guidance_scale`` and mean "off";
    use :func:`guidance.diffusion.attach` for those.

    The first step runs at the pipeline's ``guidance_scale`` argument: pass
    ``guidance_scale=callback.first_scale(num_inference_steps)`` (it must be > 1 so that the
    pipeline builds the unconditional conditioning at all). A mismatch warns after step 0.

    Example:
        >>> from guidance.diffusion import ScheduleCallback
        >>> from guidance.diffusion.testing import tiny_stable_diffusion
        >>> from guidance.schedules import Linear
        >>> pipe = tiny_stable_diffusion()
        >>> callback = ScheduleCallback.for_pipeline(pipe, Linear(7.0, 1.0))
        >>> out = pipe("a cat", guidance_scale=callback.first_scale(4), num_inference_steps=4,
        ...            height=16, width=16, output_type="latent", callback_on_step_end=callback)
        >>> [round(s, 3) for s in callback.scales]
        [7.0, 5.0, 3.0, 1.0]
    """

    # Not @register_to_config: a schedule object is not JSON-serialisable config.
    def __init__(self, schedule: Schedule | float, tensor_inputs: list[str] | tuple[str, ...] | None = None):
        super().__init__(cutoff_step_ratio=1.0)
        self.schedule = as_schedule(schedule)
        self._tensor_inputs = list(tensor_inputs) if tensor_inputs is not None else ["prompt_embeds"]
        self._saved: dict[str, Tensor] = {}
        self.scales: list[float] = []

    @classmethod
    def for_pipeline(cls, pipe: Any, schedule: Schedule | float) -> ScheduleCallback:
        return cls(schedule, tensor_inputs=conditioning_inputs(pipe))

    @property
    def tensor_inputs(self) -> list[str]:
        return self._tensor_inputs

    def __repr__(self) -> str:
        return f"ScheduleCallback(schedule={self.schedule!r}, tensor_inputs={self._tensor_inputs})"

    def first_scale(self, num_inference_steps: int, sigma: float | None = None) -> float:
        """The schedule's scale for step 0: pass it as the pipeline's ``guidance_scale``."""
        return float(self.schedule(0, num_inference_steps, sigma))

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict) -> dict:
        num_steps = pipeline.num_timesteps
        scheduler = pipeline.scheduler
        if step_index == 0:
            self._saved = {}
            used = float(pipeline.guidance_scale)
            level = noise_level_at(scheduler, scheduler.timesteps[0], 0)
            wanted = float(self.schedule(0, num_steps, schedule_sigma(level)))
            self.scales = [used]
            if abs(used - wanted) > 1e-12 * max(1.0, abs(wanted)):
                warnings.warn(
                    f"Step 0 ran at the pipeline's guidance_scale={used}, the schedule asks for {wanted}: pass "
                    f"`guidance_scale=callback.first_scale({num_steps})` (callbacks run after a step, so they "
                    "cannot set the first one).",
                    UserWarning,
                    stacklevel=2,
                )
        next_step = step_index + 1
        if next_step >= num_steps:
            return callback_kwargs
        level = noise_level_at(scheduler, scheduler.timesteps[next_step], next_step)
        scale = float(self.schedule(next_step, num_steps, schedule_sigma(level)))
        if 0 < scale < 1 or scale < 0:
            warnings.warn(
                f"The schedule asks for guidance scale {scale} at step {next_step}; a pipeline only guides at "
                "scales > 1, so this step runs unguided. Use guidance.diffusion.attach for scales < 1.",
                UserWarning,
                stacklevel=2,
            )
        guided_now = bool(getattr(pipeline, "do_classifier_free_guidance", pipeline.guidance_scale > 1))
        guided_next = scale > 1
        if guided_now and not guided_next:
            for name in self._tensor_inputs:
                self._saved[name], callback_kwargs[name] = _cond_half(callback_kwargs[name], name)
        elif guided_next and not guided_now:
            missing = [name for name in self._tensor_inputs if name not in self._saved]
            if missing:
                raise ValueError(
                    f"The schedule turns guidance on at step {next_step}, but the unconditional conditioning "
                    f"({missing}) was never built: start the pipeline with guidance_scale > 1."
                )
            import torch

            for name in self._tensor_inputs:
                callback_kwargs[name] = torch.cat([self._saved[name], callback_kwargs[name]])
        pipeline._guidance_scale = scale
        self.scales.append(scale)
        return callback_kwargs
