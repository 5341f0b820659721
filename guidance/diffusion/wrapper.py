"""The denoiser wrapper of :func:`~guidance.diffusion.attach`: one guided step per denoiser call.

For every call the pipeline makes on its stacked ``[uncond, cond]`` batch the wrapper

1. finds the step (:class:`~guidance.diffusion.steps.StepTracker`) and the scheduler's noise level;
2. plans: the branches the guider needs (:func:`guidance.branches.branches_of`; none but
   ``cond`` where a schedule, a guidance interval or a zero-init step turns guidance off) and the
   samples that still need them (adaptive guidance / a cut-off retires samples);
3. builds one :class:`~guidance.diffusion.branches.BranchRequest` per branch (its rows of the
   pipeline's call, inputs replaced, the network and the hook) and has the handle's evaluator
   run them (one batched call where possible);
4. combines: ``guide(guider, cond, uncond, **extras)`` (in x0 space when ``guider.space == "x0"``),
   retired samples keep ``cond``; and returns ``[g, g]``, so that the pipeline's own
   ``u + w (c - u)`` gives back ``g`` exactly whatever its ``guidance_scale``.

Calls that are not a stacked CFG batch (the pipeline is not doing CFG, SD3's own skip-layer
calls) pass through to the original ``forward`` untouched.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from guidance.branches import COND, UNCOND, Branch, branches_of
from guidance.diffusion.batch import DenoiserCall, with_prediction
from guidance.diffusion.branches import BranchRequest, Denoiser
from guidance.diffusion.cfgpp import CFGPPStepper
from guidance.diffusion.schedulers import diffusers_classes, noise_level_at, num_steps, schedule_sigma
from guidance.diffusion.schedulers import prediction_type as scheduler_prediction_type
from guidance.diffusion.stats import GuidanceStats
from guidance.diffusion.steps import StepTracker
from guidance.guiders import guide
from guidance.spaces import NoiseLevel
from guidance.tensors import per_sample
from guidance.validation import is_real_number
from samplers.cfgpp import validate_cfgpp_scale

if TYPE_CHECKING:
    from guidance.diffusion.attach import GuidanceHandle

__all__ = ["DenoiserWrapper", "StepContext"]

# Pipelines that put the conditional rows first (``cat([cond, uncond])``).
COND_FIRST_PIPELINES = ("DiTPipeline",)


@dataclass
class StepContext:
    """Where a guided call is: step, run length, noise level, and the guidance decisions for it."""

    step: int
    num_steps: int | None
    level: NoiseLevel | None
    sigma: float | None
    batch: int
    scale: float = 1.0
    branches: tuple[Branch, ...] = (COND,)
    active: Tensor | None = None  # (batch,) bool: samples whose non-cond branches are evaluated

    @property
    def guided(self) -> bool:
        return len(self.branches) > 1

    @property
    def n_active(self) -> int:
        return 0 if self.active is None else int(self.active.sum())


class DenoiserWrapper:
    """Replaces ``forward`` of the pipeline's denoiser while guidance is attached (see the module docstring)."""

    def __init__(self, handle: GuidanceHandle, forward: Any):
        self.handle = handle
        self.signature = inspect.signature(forward)
        self.sample_name = next(iter(self.signature.parameters))
        self.own = Denoiser(handle.module, forward, self._record_output)
        self.steps = StepTracker()
        self.cfgpp = CFGPPStepper()
        self._models: dict[int, Denoiser] = {}
        self._template: Any = None
        self._warned: set[str] = set()

    # -- dispatch -------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arguments = self.signature.bind_partial(*args, **kwargs).arguments
        sample = arguments.get(self.sample_name)
        if not isinstance(sample, Tensor) or "skip_layers" in kwargs:
            return self._passthrough(args, kwargs, sample)
        timestep = arguments.get("timestep", args[1] if len(args) > 1 else None)
        if not self._is_cfg_batch(sample):
            self._unguided_step(timestep)
            return self._passthrough(args, kwargs, sample)
        call = DenoiserCall(self.signature, args, kwargs, sample.shape[0])
        return self._guided(call, sample, timestep)

    def _is_cfg_batch(self, sample: Tensor) -> bool:
        if getattr(self.handle.pipe, "do_classifier_free_guidance", None) is False:
            return False
        half, odd = divmod(sample.shape[0], 2)
        return not odd and half > 0 and bool(torch.equal(sample[:half], sample[half:]))

    def _passthrough(self, args: tuple, kwargs: dict, sample: Any) -> Any:
        if isinstance(sample, Tensor):
            self.handle.stats.passthrough_rows += sample.shape[0]
            self.handle.stats.forward_calls += 1
        return self.own.forward(*args, **kwargs)

    def _unguided_step(self, timestep: Any) -> None:
        pipe = self.handle.pipe
        require = getattr(self.handle.evaluator, "require_cfg_batch", None)
        if callable(require):  # CFG-parallel: nothing to split, fail before the first step
            require(pipe)
        self._context(timestep, batch=0)
        if getattr(pipe, "do_classifier_free_guidance", None) is False:
            self._warn_once(
                "no-cfg",
                f"{type(pipe).__name__} is not doing classifier-free guidance in this run "
                f"(guidance_scale={getattr(pipe, 'guidance_scale', None)!r} <= 1), so the attached guider never "
                "sees an unconditional prediction. Pass any guidance_scale > 1 to the pipeline: the attached "
                "guider sets the scale.",
            )
        else:
            self._warn_once(
                "no-batch",
                f"The denoiser input of {type(pipe).__name__} is not a stacked [uncond, cond] batch "
                "(two equal halves of latents); this call is left unguided.",
            )

    # -- one guided step ------------------------------------------------------------------------
    def _guided(self, call: DenoiserCall, sample: Tensor, timestep: Any) -> Any:
        ctx = self._context(timestep, batch=call.batch // 2)
        self._plan(ctx)
        requests = self._requests(call, ctx)
        predictions = self.handle.evaluator.evaluate(requests)
        self._count(ctx, requests)
        cond_start = 0 if self._cond_first() else ctx.batch
        guided = self._combine(ctx, predictions, sample[cond_start : cond_start + ctx.batch])
        return self._output(call, torch.cat([guided, guided]))

    def _context(self, timestep: Any, batch: int) -> StepContext:
        scheduler = self.handle.pipe.scheduler
        step, new_run = self.steps.step(scheduler, timestep)
        if new_run:
            self._new_run()
        level = noise_level_at(scheduler, timestep, step)
        return StepContext(step, num_steps(scheduler), level, schedule_sigma(level), batch)

    def _plan(self, ctx: StepContext) -> None:
        handle, stats = self.handle, self.handle.stats
        if stats.batch_size == 0:
            stats.batch_size = ctx.batch
            if handle.adaptive is not None:
                stats.passed_at = [None] * ctx.batch
        stats.steps += 1
        ctx.scale = handle.guider.scale_at(ctx.step, ctx.num_steps, ctx.sigma)
        stats.scales.append(ctx.scale)
        if handle.mode == "cfgpp":
            validate_cfgpp_scale(ctx.scale, "scale (CFG++'s lambda)")
            ctx.branches = (COND, UNCOND)
        else:
            ctx.branches = branches_of(handle.guider, ctx.step, ctx.num_steps, ctx.sigma)
        ctx.active = torch.full((ctx.batch,), ctx.guided, dtype=torch.bool)
        if ctx.guided and handle.adaptive is not None:
            ctx.active &= handle.adaptive.needs_uncond(ctx.step, ctx.num_steps, ctx.batch).to(
                "cpu", torch.bool
            )

    def _ordered(self, branches: tuple[Branch, ...]) -> list[Branch]:
        """The pipeline's own two branches in its batch order, then the extra ones as declared."""
        own = {b.name: b for b in branches if b.name in ("cond", "uncond")}
        names = ("cond", "uncond") if self._cond_first() else ("uncond", "cond")
        return [own[n] for n in names if n in own] + [b for b in branches if b.name not in own]

    def _requests(self, call: DenoiserCall, ctx: StepContext) -> list[BranchRequest]:
        cond_first = self._cond_first()
        offsets = {"cond": 0 if cond_first else ctx.batch, "uncond": ctx.batch if cond_first else 0}
        active = ctx.active.nonzero().flatten()
        requests = []
        for branch in self._ordered(ctx.branches):
            samples = torch.arange(ctx.batch) if branch.name == "cond" else active
            if len(samples) == 0:
                continue
            inputs = call.rows(samples + offsets[branch.source])
            replaced = self._inputs_of(branch)
            if replaced:
                inputs = inputs.replace(replaced, samples, ctx.batch, f"branch_inputs[{branch.name!r}]")
            requests.append(BranchRequest(branch.name, inputs, self._denoiser(branch.model), branch.hook))
        return requests

    def _inputs_of(self, branch: Branch) -> dict[str, Any]:
        given = self.handle.branch_inputs.get(branch.name, {})
        inputs = {**(branch.inputs or {}), **given}
        if branch.name != "cond" and branch.source == "cond" and branch.is_plain and not inputs:
            raise ValueError(
                f"{type(self.handle.guider).__name__} asks for a {branch.name!r} branch, which would be the "
                f"conditional prediction again: pass its inputs, e.g. `attach(pipe, guider, branch_inputs="
                f"{{{branch.name!r}: {{'encoder_hidden_states': embeds}}}})` (see guidance.diffusion.prompt_inputs)."
            )
        return inputs

    def _denoiser(self, model: Any) -> Denoiser:
        if model is None:
            return self.own
        if id(model) not in self._models:
            self._models[id(model)] = Denoiser(model, model, self._record_output)
        return self._models[id(model)]

    def _count(self, ctx: StepContext, requests: list[BranchRequest]) -> None:
        stats = self.handle.stats
        for request in requests:
            stats.count(request.name, len(request))
        stats.uncond_skipped += ctx.batch - sum(len(r) for r in requests if r.name == "uncond")

    def _combine(self, ctx: StepContext, predictions: dict[str, Tensor], x: Tensor) -> Tensor:
        cond = predictions["cond"]
        variance = None
        if x.ndim > 1 and cond.ndim > 1 and cond.shape[1] == 2 * x.shape[1]:
            # Learned variance (DiT, IF): guide the first half of the channels, keep cond's variance.
            variance, channels = cond[:, x.shape[1] :], x.shape[1]
            predictions = {name: pred[:, :channels] for name, pred in predictions.items()}
            cond = predictions["cond"]
        extras = {name: self._fill(pred, cond, ctx) for name, pred in predictions.items() if name != "cond"}
        uncond = extras.pop("uncond", None)
        if self.handle.adaptive is not None and ctx.n_active:
            self._update_adaptive(ctx, predictions)
        guided = self._guide(ctx, x, cond, uncond, extras)
        return guided if variance is None else torch.cat([guided, variance], dim=1)

    @staticmethod
    def _fill(pred: Tensor, cond: Tensor, ctx: StepContext) -> Tensor:
        """A branch's prediction for the whole batch: ``cond`` in the rows of retired samples."""
        if ctx.n_active == ctx.batch:
            return pred
        full = cond.clone()
        full[ctx.active.to(cond.device)] = pred
        return full

    def _update_adaptive(self, ctx: StepContext, predictions: dict[str, Tensor]) -> None:
        """The adaptive policy compares ``cond`` with ``uncond`` (or the first extra branch where there is none)."""
        others = [name for name in predictions if name != "cond"]
        reference = predictions["uncond" if "uncond" in predictions else others[0]]
        cond = predictions["cond"]
        if ctx.n_active < ctx.batch:
            cond = cond[ctx.active.to(cond.device)]
        self.handle.adaptive.update(ctx.step, cond, reference, ctx.active)
        stats = self.handle.stats
        stats.passed_at = list(getattr(self.handle.adaptive, "passed_at", stats.passed_at))

    def _guide(
        self, ctx: StepContext, x: Tensor, cond: Tensor, uncond: Tensor | None, extras: dict
    ) -> Tensor:
        handle = self.handle
        kwargs = {"step": ctx.step, "num_steps": ctx.num_steps, "sigma": ctx.sigma}
        if handle.mode == "cfgpp":
            level = self._require_level(ctx, "CFG++")
            uncond = cond if uncond is None else uncond
            return self.cfgpp.prepare(x, cond, uncond, ctx.scale, level, self._prediction_type())
        if not ctx.guided:
            return handle.guider(cond, None, **kwargs)
        if ctx.n_active == 0:
            return cond
        prediction = None
        if handle.guider.space == "x0":
            prediction = self._prediction_type()
            self._require_level(ctx, type(handle.guider).__name__)
        guided = guide(
            handle.guider,
            cond,
            uncond,
            **kwargs,
            sample=x,
            prediction_type=prediction,
            noise_level=ctx.level,
            **extras,
        )
        if ctx.n_active < ctx.batch:
            mask = per_sample(ctx.active.to(cond.device), cond)
            guided = torch.where(mask, guided, cond)
        return guided

    def _require_level(self, ctx: StepContext, who: str) -> NoiseLevel:
        if ctx.level is None:
            scheduler = self.handle.pipe.scheduler
            raise ValueError(
                f"{who} acts on x0, but the noise level of {type(scheduler).__name__} at step {ctx.step} is "
                "unknown (it exposes neither `sigmas` nor `alphas_cumprod`)."
            )
        return ctx.level

    def _output(self, call: DenoiserCall, pred: Tensor) -> Any:
        if self._template is None:  # no own-denoiser output seen (a foreign evaluator ran everything)
            return (pred,) if call.argument("return_dict", True) is False else pred
        return with_prediction(self._template, pred)

    # -- run state ------------------------------------------------------------------------------
    def _record_output(self, out: Any) -> None:
        self._template = out
        self.handle.stats.forward_calls += 1

    def _new_run(self) -> None:
        handle = self.handle
        self._warned.clear()
        self.cfgpp.reset()
        handle.guider.reset()
        if handle.adaptive is not None:
            handle.adaptive.reset()
        handle.stats = GuidanceStats()
        handle.runs.append(handle.stats)
        rescale = getattr(handle.pipe, "guidance_rescale", 0.0)
        if is_real_number(rescale) and rescale > 0:
            self._warn_once(
                "rescale",
                f"The pipeline's `guidance_rescale={rescale}` is applied on top of the attached guider's output; "
                "pass `rescale=` to the guider (e.g. `CFG(scale, rescale=0.7)`) and leave the pipeline's at 0.",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=5)

    def _cond_first(self) -> bool:
        order = self.handle.order
        if order == "auto":
            return isinstance(self.handle.pipe, diffusers_classes(COND_FIRST_PIPELINES))
        return order == "cond_first"

    def _prediction_type(self) -> str:
        if self.handle.prediction_type is not None:
            return self.handle.prediction_type
        return scheduler_prediction_type(self.handle.pipe.scheduler)
