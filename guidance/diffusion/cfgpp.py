"""CFG++ in a classic pipeline: the denoiser wrapper keeps both x0 estimates, ``scheduler.step`` re-noises with ``u``.

CFG++ (:mod:`samplers.cfgpp`) is not a function of one combined prediction: it takes x0 from the
guided estimate and the noise from the unconditional one. :class:`CFGPPStepper` therefore

1. at the denoiser call, converts ``c`` and ``u`` to x0 (:func:`guidance.spaces.to_x0`, at the
   denoiser input's noise level) and keeps ``x0_hat = cfg(x0_c, x0_u, lambda)`` and ``x0_u``;
2. replaces ``pipe.scheduler.step`` (an instance attribute, removed on detach) with a step that
   reads the sample's noise levels from the scheduler (:func:`~guidance.diffusion.schedulers.step_noise_levels`)
   and calls the pure :func:`samplers.cfgpp.cfgpp_step`: one formula, in one place;
3. advances the scheduler by calling its own ``step`` (result discarded, with a throwaway random
   generator so that the user's generator is not consumed twice): diffusers offers no other
   public way to move a scheduler's step index, and this leaves the scheduler exactly as its own
   step would.

Samples retired by adaptive guidance arrive with ``u = c``; then ``x0_hat = x0_u = x0_c`` exactly
and the step is the plain one on ``c``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from guidance.diffusion.patching import InstancePatch
from guidance.diffusion.schedulers import diffusers_classes, prediction_type, step_index, step_noise_levels
from guidance.ops import cfg
from guidance.spaces import NoiseLevel, to_x0
from samplers.cfgpp import cfgpp_step

__all__ = ["CFGPP_SCHEDULERS", "check_cfgpp_scheduler", "CFGPPStepper"]

CFGPP_SCHEDULERS = (
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
)


def _is(scheduler: Any, *names: str) -> bool:
    return isinstance(scheduler, diffusers_classes(names))


def check_cfgpp_scheduler(scheduler: Any) -> None:
    """``ValueError`` unless CFG++ can replace this scheduler's ``step`` (type, config, prediction type)."""
    name = type(scheduler).__name__
    if not _is(scheduler, *CFGPP_SCHEDULERS):
        raise ValueError(
            f"CFG++ cannot drive {name}: it replaces the scheduler's step and supports {', '.join(CFGPP_SCHEDULERS)}. "
            f"Swap the scheduler, e.g. `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`."
        )
    config = scheduler.config
    if _is(scheduler, "DDIMScheduler") and config.get("thresholding"):
        raise ValueError(
            "CFG++ does not support DDIMScheduler with `thresholding=True` (dynamic thresholding)."
        )
    if _is(scheduler, "FlowMatchEulerDiscreteScheduler") and config.get("stochastic_sampling"):
        raise ValueError(
            "CFG++ does not support FlowMatchEulerDiscreteScheduler with `stochastic_sampling=True`."
        )
    prediction_type(scheduler)


class CFGPPStepper:
    """Holds a step's x0 estimates and drives ``scheduler.step`` with CFG++ while installed."""

    def __init__(self) -> None:
        self.scheduler: Any = None
        self._patch: InstancePatch | None = None
        self._signature: inspect.Signature | None = None
        self._pending: tuple[Tensor, Tensor] | None = None

    # -- installing -----------------------------------------------------------------------------
    def install(self, scheduler: Any) -> None:
        """Replace ``scheduler.step`` (a no-op if already done for this scheduler)."""
        if scheduler is self.scheduler:
            return
        check_cfgpp_scheduler(scheduler)
        self.uninstall()
        self.scheduler = scheduler
        self._patch = InstancePatch(scheduler, "step", self.step)
        self._signature = inspect.signature(self._patch.original)

    def uninstall(self) -> None:
        """Give the scheduler its own ``step`` back."""
        patch, self._patch, self.scheduler, self._pending = self._patch, None, None, None
        if patch is not None:
            patch.restore()

    def reset(self) -> None:
        """Forget a pending step (start of a run)."""
        self._pending = None

    # -- the two halves of a CFG++ step ---------------------------------------------------------
    def prepare(
        self, x: Tensor, cond: Tensor, uncond: Tensor, scale: float, level: NoiseLevel, prediction: str
    ) -> Tensor:
        """Keep ``x0_hat`` and ``x0_u`` for the coming ``step``; returns the prediction handed to the pipeline."""
        x0_c = to_x0(cond, x, prediction, level)
        x0_u = to_x0(uncond, x, prediction, level)
        self._pending = (cfg(x0_c, x0_u, scale), x0_u)
        return cfg(cond, uncond, scale)

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, *args: Any, **kwargs: Any) -> Any:
        pending, self._pending = self._pending, None
        if pending is None:  # not a guided step (the pipeline skipped CFG): the scheduler's own update
            return self._patch.original(model_output, timestep, sample, *args, **kwargs)
        options = self._signature.bind(model_output, timestep, sample, *args, **kwargs)
        options.apply_defaults()
        opts = options.arguments
        if opts.get("s_churn", 0.0) or opts.get("per_token_timesteps") is not None:
            raise ValueError(
                f"CFG++ replaces {type(self.scheduler).__name__}.step and supports neither `s_churn` > 0 "
                "nor per-token timesteps."
            )
        denoised, uncond_denoised = (_rows_like(t, sample) for t in pending)
        level, next_level = step_noise_levels(self.scheduler, timestep, step_index(self.scheduler, timestep))
        if _is(self.scheduler, "DDIMScheduler") and self.scheduler.config.clip_sample:
            limit = self.scheduler.config.clip_sample_range
            denoised = denoised.clamp(-limit, limit)
        eta, noise = self._noise(opts, model_output)
        prev_sample = cfgpp_step(sample, denoised, uncond_denoised, level, next_level, eta=eta, noise=noise)
        self._advance(options, model_output.device)
        prev_sample = prev_sample.to(model_output.dtype)
        if not opts.get("return_dict", True):
            return (prev_sample, denoised)
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        return SchedulerOutput(prev_sample=prev_sample)

    def _noise(self, opts: dict[str, Any], like: Tensor) -> tuple[float, Tensor | None]:
        """``(eta, noise)``: DDIM's ``eta`` and ``variance_noise``, ancestral Euler's eta 1; noise drawn as diffusers does."""
        eta, noise = 0.0, None
        if _is(self.scheduler, "DDIMScheduler"):
            eta = float(opts.get("eta") or 0.0)
            noise = opts.get("variance_noise") if eta > 0 else None
        elif _is(self.scheduler, "EulerAncestralDiscreteScheduler"):
            eta = 1.0
        if eta > 0 and noise is None:
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(
                like.shape, generator=opts.get("generator"), device=like.device, dtype=like.dtype
            )
        return eta, noise

    def _advance(self, options: inspect.BoundArguments, device: torch.device) -> None:
        """Run the scheduler's own step for its state (step index), not its result; see the module docstring."""
        arguments = dict(options.arguments)
        if "generator" in arguments:
            arguments["generator"] = torch.Generator(device=device)
        if "return_dict" in arguments:
            arguments["return_dict"] = False
        advance = inspect.BoundArguments(options.signature, arguments)
        self._patch.original(*advance.args, **advance.kwargs)


def _rows_like(value: Tensor, sample: Tensor) -> Tensor:
    """``value`` repeated to ``sample``'s rows for pipelines that step both CFG halves (DiT)."""
    if sample.shape[0] != value.shape[0] and sample.shape[0] % value.shape[0] == 0:
        return value.repeat(sample.shape[0] // value.shape[0], *[1] * (value.ndim - 1))
    return value
