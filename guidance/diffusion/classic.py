"""Guidance for classic diffusers pipelines: wrap the denoiser, not the pipeline.

:func:`attach` replaces ``pipe.unet.forward`` (or ``pipe.transformer.forward``) with a wrapper
that sees the stacked ``[uncond, cond]`` batch the pipeline builds when it does classifier-free
guidance. The wrapper

1. splits every batched conditioning input (``encoder_hidden_states``, ``class_labels``,
   ``added_cond_kwargs`` entries, ``pooled_projections``, a batched ``timestep``, ControlNet
   residuals, ...: any tensor whose first dimension is the batch, in dicts, lists and tuples too),
2. runs the conditional rows and only the unconditional rows still needed (none where the
   guider's schedule is off, none for samples that adaptive guidance or a cut-off retired),
   in one forward call,
3. combines them with the guider (in x0 space via :mod:`guidance.spaces` when ``guider.space ==
   "x0"``, with the scheduler's noise level at that step), and
4. returns ``[g, g]``, so the pipeline's own ``u + w (c - u)`` gives back ``g`` exactly whatever
   its ``guidance_scale``.

It tracks the step index (the scheduler's ``step_index`` where it has one, else the number of
denoiser calls since ``set_timesteps``, offset by the position of the first timestep), resets
the guider and the adaptive policy whenever the pipeline calls ``scheduler.set_timesteps`` (a new
run), and counts network evaluations per run (:class:`GuidanceStats`).

The pipeline must still do CFG (``guidance_scale > 1``; its value no longer matters) so that it
builds the unconditional batch; the attached guider decides the rest. With ``mode="cfgpp"`` the
wrapper also replaces ``pipe.scheduler.step`` with a CFG++ step (:mod:`samplers.cfgpp`), because
CFG++ re-noises with ``u`` and is not a function of one combined prediction.

The schedules receive ``sigma`` in the scheduler's own convention: the k-diffusion sigma
``sqrt((1 - alpha_cumprod) / alpha_cumprod)`` for DDPM-style models (what Euler/DPM-Solver
schedulers store in ``scheduler.sigmas``) and the flow-matching sigma in ``[0, 1]`` for SD3/Flux.

Example:
    >>> import torch
    >>> from guidance.adaptive import AdaptiveGuidance
    >>> from guidance.diffusion import attach
    >>> from guidance.diffusion.testing import tiny_stable_diffusion
    >>> from guidance.guiders import CFG
    >>> from guidance.schedules import Linear
    >>> pipe = tiny_stable_diffusion()
    >>> with attach(pipe, CFG(Linear(1.0, 7.5)), adaptive=AdaptiveGuidance(0.999)) as handle:
    ...     images = pipe("a cat", guidance_scale=2.0, num_inference_steps=4, height=16, width=16,
    ...                   output_type="latent").images
    >>> handle.stats.evaluations <= 2 * 4  # the scale-1 first step ran the conditional rows only
    True
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from guidance.adaptive import UncondPolicy
from guidance.guiders import CFG, Guider, guide
from guidance.ops import cfg
from guidance.schedules import Schedule
from guidance.spaces import NoiseLevel, normalize_prediction_type, scheduler_prediction_type, to_x0
from samplers.cfgpp import cfgpp_step, validate_cfgpp_scale

__all__ = [
    "GuidanceStats",
    "GuidanceHandle",
    "attach",
    "detach",
    "CFGPP_SCHEDULERS",
    "schedule_sigma",
]

MODES = ("guide", "cfgpp")
ORDERS = ("auto", "uncond_first", "cond_first")
# Pipelines that put the conditional rows first (``cat([cond, uncond])``).
_COND_FIRST_PIPELINES = ("DiTPipeline",)
# Inputs whose first dimension is not the batch even when it happens to have the same size.
_NOT_BATCHED = frozenset({"txt_ids", "img_ids", "return_dict"})
CFGPP_SCHEDULERS = (
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
)


@dataclass
class GuidanceStats:
    """Network evaluations of one sampling run (one pipeline call).

    ``cond_rows`` / ``uncond_rows`` count the conditional / unconditional sample rows the
    denoiser evaluated in guided calls, ``passthrough_rows`` the rows of calls the wrapper left
    alone (the pipeline was not doing CFG, or an extra call such as SD3's skip-layer guidance).
    ``uncond_skipped`` counts unconditional rows the pipeline asked for but the wrapper did not
    evaluate. ``scales`` holds the guider's scale per guided step, ``passed_at`` the step at which
    adaptive guidance retired each sample (``None``: never).
    """

    batch_size: int = 0
    steps: int = 0
    forward_calls: int = 0
    cond_rows: int = 0
    uncond_rows: int = 0
    passthrough_rows: int = 0
    uncond_skipped: int = 0
    scales: list[float] = field(default_factory=list)
    passed_at: list[int | None] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        """Sample rows evaluated by the denoiser (one row = one network evaluation of one sample)."""
        return self.cond_rows + self.uncond_rows + self.passthrough_rows

    @property
    def evaluations_per_image(self) -> float:
        return self.evaluations / self.batch_size if self.batch_size else 0.0


def _denoiser_name(pipe: Any, denoiser: str | None) -> str:
    if denoiser is not None:
        if getattr(pipe, denoiser, None) is None:
            raise ValueError(f"`denoiser={denoiser!r}`: the pipeline has no such component.")
        return denoiser
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(
        f"{type(pipe).__name__} has neither a `unet` nor a `transformer`; pass `denoiser=` with the name of "
        "the component that predicts the noise."
    )


def _config_get(module: Any, key: str) -> Any:
    config = getattr(module, "config", None)
    if config is None:
        return None
    return config.get(key) if hasattr(config, "get") else getattr(config, key, None)


def _check_not_distilled(module: Any, name: str) -> None:
    if _config_get(module, "guidance_embeds"):
        raise ValueError(
            f"`pipe.{name}` ({type(module).__name__}) has `guidance_embeds=True`: it is a guidance-distilled "
            "model (Flux-dev style) that takes the guidance scale as an input and is never run on an "
            "unconditional batch. Pass the scale to the pipeline (`guidance_scale=`) instead of attaching a guider."
        )
    if _config_get(module, "time_cond_proj_dim") is not None:
        raise ValueError(
            f"`pipe.{name}` ({type(module).__name__}) has `time_cond_proj_dim` set: it is guidance-distilled "
            "(LCM style, the scale is embedded), and its pipeline never builds an unconditional batch."
        )


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _PipelineScale:
    """Schedule that reads the pipeline's own ``guidance_scale`` at every step (``attach(pipe)`` without a guider)."""

    def __init__(self, pipe: Any):
        self.pipe = pipe

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        scale = getattr(self.pipe, "_guidance_scale", None)
        if not _is_number(scale):
            raise ValueError(
                f"{type(self.pipe).__name__} does not expose its guidance scale (`_guidance_scale`); "
                "pass a guider or a scale to `attach`."
            )
        return float(scale)

    def __repr__(self) -> str:
        return "pipe.guidance_scale"


def _as_guider(pipe: Any, guider: Guider | float | Schedule | None) -> Guider:
    if guider is None:
        return CFG(_PipelineScale(pipe))
    if isinstance(guider, Guider):
        return guider
    if isinstance(guider, bool):
        raise ValueError(f"`guider` must be a Guider, a scale or a schedule, got {guider!r}.")
    if isinstance(guider, (int, float)) or callable(guider):
        return CFG(guider)
    raise ValueError(
        f"`guider` must be a guidance.guiders.Guider, a scale or a schedule, got {type(guider).__name__}."
    )


def _take_rows(value: Any, rows: slice | Tensor, batch: int) -> Any:
    """``value`` restricted to ``rows`` wherever its first dimension is the batch (recursing into containers)."""
    if isinstance(value, Tensor):
        if value.ndim >= 1 and value.shape[0] == batch:
            return value[rows] if isinstance(rows, slice) else value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, dict):
        return {k: v if k in _NOT_BATCHED else _take_rows(v, rows, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not (isinstance(value, tuple) and hasattr(value, "_fields")):
        return type(value)(_take_rows(v, rows, batch) for v in value)
    return value


def _delegate(target: Any, original: Any) -> Any:
    """A function calling ``target`` that looks like ``original`` (name, docstring, signature)."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return target(*args, **kwargs)

    return wrapper


def _prediction_of(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    raise ValueError(f"Cannot find the prediction in the denoiser's output of type {type(out).__name__}.")


def _with_prediction(out: Any, pred: Tensor) -> Any:
    if isinstance(out, Tensor):
        return pred
    if isinstance(out, tuple):
        return (pred, *out[1:])
    fields = dict(out)
    key = "sample" if "sample" in fields else next(iter(fields))
    fields[key] = pred
    return type(out)(**fields)


def schedule_sigma(level: NoiseLevel | None) -> float | None:
    """The noise level handed to schedules: flow sigma for flow matching, else ``sigma / alpha`` (k-diffusion sigma)."""
    if level is None:
        return None
    if level.is_flow:
        return float(level.sigma)
    alpha = float(level.alpha)
    return math.inf if alpha == 0 else float(level.sigma) / alpha


def noise_level_at(scheduler: Any, timestep: Any, step: int | None) -> NoiseLevel | None:
    """The denoiser input's noise level at ``step``, or ``None`` when the scheduler does not say."""
    try:
        return NoiseLevel.from_scheduler(scheduler, timestep=timestep, step_index=step)
    except (ValueError, IndexError, TypeError, RuntimeError):
        return None


class GuidanceHandle:
    """What :func:`attach` returns: the configuration, per-run statistics, and :meth:`detach`.

    Use it as a context manager to detach on exit. ``stats`` is the current (or last) run's
    :class:`GuidanceStats`, ``runs`` all runs since attaching.
    """

    def __init__(
        self,
        pipe: Any,
        guider: Guider,
        adaptive: UncondPolicy | None,
        mode: str,
        prediction_type: str | None,
        order: str,
        denoiser: str,
    ):
        self.pipe = pipe
        self.guider = guider
        self.adaptive = adaptive
        self.mode = mode
        self.prediction_type = prediction_type
        self.order = order
        self.denoiser_name = denoiser
        self.module = getattr(pipe, denoiser)
        self.runs: list[GuidanceStats] = []
        self.stats = GuidanceStats()
        self._original_forward = self.module.forward
        self._had_instance_forward = "forward" in self.module.__dict__
        self._signature = inspect.signature(self._original_forward)
        self._sample_name = next(iter(self._signature.parameters))
        self._run_key: tuple[Any, Any] | None = None
        self._calls = 0
        self._offset = 0
        self._last_step: int | None = None
        self._warned: set[str] = set()
        self._cfgpp_state: dict[str, Any] | None = None
        self._patched_scheduler: Any = None
        self._original_step: Any = None
        self._had_instance_step = False
        self._step_signature: inspect.Signature | None = None
        self._attached = False

    # ----------------------------------------------------------------- lifecycle
    def _install(self) -> None:
        # One function object with the original signature: `detach` recognises it, and pipelines that
        # inspect `forward`'s parameters see the real ones.
        self._wrapper = _delegate(self._forward, self._original_forward)
        self.module.forward = self._wrapper
        if self.mode == "cfgpp":
            self._patch_scheduler(self.pipe.scheduler)
        self.pipe._guidance_handle = self
        self._attached = True

    def detach(self) -> None:
        """Restore the denoiser's ``forward`` (and the scheduler's ``step`` in CFG++ mode)."""
        if not self._attached:
            return
        current = self.module.__dict__.get("forward")
        if current is not self._wrapper:
            warnings.warn(
                f"`pipe.{self.denoiser_name}.forward` was replaced after `attach` (e.g. by offload hooks); "
                "it is restored to what it was before `attach`.",
                stacklevel=2,
            )
        if self._had_instance_forward:
            self.module.forward = self._original_forward
        else:
            self.module.__dict__.pop("forward", None)
        self._unpatch_scheduler()
        if getattr(self.pipe, "_guidance_handle", None) is self:
            del self.pipe._guidance_handle
        self._attached = False

    def reset(self) -> None:
        """Start a new run now (the wrapper also does this whenever the pipeline calls ``set_timesteps``)."""
        self._run_key = None

    def __enter__(self) -> GuidanceHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (
            f"GuidanceHandle({type(self.pipe).__name__}.{self.denoiser_name}, guider={self.guider!r}, "
            f"adaptive={self.adaptive!r}, mode={self.mode!r})"
        )

    # ----------------------------------------------------------------- helpers
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)

    def _new_run(self, scheduler: Any) -> None:
        self._run_key = (scheduler, scheduler.timesteps if hasattr(scheduler, "timesteps") else None)
        self._calls = 0
        self._last_step = None
        self._warned.clear()
        self._cfgpp_state = None
        self.guider.reset()
        if self.adaptive is not None:
            self.adaptive.reset()
        self.stats = GuidanceStats()
        self.runs.append(self.stats)
        rescale = getattr(self.pipe, "_guidance_rescale", 0.0)
        if _is_number(rescale) and rescale > 0:
            self._warn_once(
                "rescale",
                f"The pipeline's `guidance_rescale={rescale}` is applied on top of the attached guider's output; "
                "pass `rescale=` to the guider (e.g. `CFG(scale, rescale=0.7)`) and leave the pipeline's at 0.",
            )

    def _step_of(self, scheduler: Any, timestep: Any) -> int:
        timesteps = getattr(scheduler, "timesteps", None)
        key = (scheduler, timesteps)
        if self._run_key is None or key[0] is not self._run_key[0] or key[1] is not self._run_key[1]:
            self._new_run(scheduler)
        step_index = getattr(scheduler, "step_index", None)
        if isinstance(step_index, int):
            step = step_index
        else:
            if self._calls == 0:
                self._offset = self._first_index(scheduler, timesteps, timestep)
            step = self._offset + self._calls
        if self._last_step is not None and step < self._last_step:
            self._new_run(scheduler)
        self._calls += 1
        self._last_step = step
        return step

    @staticmethod
    def _first_index(scheduler: Any, timesteps: Any, timestep: Any) -> int:
        begin = getattr(scheduler, "begin_index", None)
        if isinstance(begin, int):
            return begin
        if not isinstance(timesteps, Tensor) or timestep is None:
            return 0
        t = timestep.flatten()[0] if isinstance(timestep, Tensor) else torch.tensor(timestep)
        matches = (timesteps == t.to(timesteps.device, timesteps.dtype)).nonzero()
        return int(matches[0, 0]) if len(matches) else 0

    def _is_cfg_batch(self, sample: Tensor) -> bool:
        do_cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
        if do_cfg is False:
            return False
        batch = sample.shape[0]
        if batch % 2:
            return False
        half = batch // 2
        return bool(torch.equal(sample[:half], sample[half:]))

    def _cond_first(self) -> bool:
        if self.order == "auto":
            return any(cls.__name__ in _COND_FIRST_PIPELINES for cls in type(self.pipe).__mro__)
        return self.order == "cond_first"

    def _prediction_type(self, scheduler: Any) -> str:
        if self.prediction_type is not None:
            return self.prediction_type
        return scheduler_prediction_type(scheduler)

    # ----------------------------------------------------------------- the wrapper
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind_partial(*args, **kwargs)
        sample = bound.arguments.get(self._sample_name)
        if not isinstance(sample, Tensor) or "skip_layers" in kwargs:
            return self._passthrough(args, kwargs, sample, count_step=False)
        if not self._is_cfg_batch(sample):
            return self._passthrough(args, kwargs, sample, count_step=True)

        scheduler = self.pipe.scheduler
        timestep = bound.arguments.get("timestep", args[1] if len(args) > 1 else None)
        step = self._step_of(scheduler, timestep)
        num_steps = len(scheduler.timesteps) if getattr(scheduler, "timesteps", None) is not None else None
        level = noise_level_at(scheduler, timestep, step)
        sigma = schedule_sigma(level)

        full = sample.shape[0]
        batch = full // 2
        cond_first = self._cond_first()
        cond_rows = slice(0, batch) if cond_first else slice(batch, full)
        uncond_start = batch if cond_first else 0
        stats = self.stats
        if stats.batch_size == 0:
            stats.batch_size = batch
            if self.adaptive is not None:
                stats.passed_at = [None] * batch
        stats.steps += 1

        if self.mode == "cfgpp":
            scale = self.guider.scale_at(step, num_steps, sigma)
            validate_cfgpp_scale(scale, "guider scale")
            needs = True
        else:
            scale = self.guider.scale_at(step, num_steps, sigma)
            needs = self.guider.needs_uncond(step, num_steps, sigma)
        active = torch.full((batch,), needs, dtype=torch.bool)
        if needs and self.adaptive is not None:
            active &= self.adaptive.needs_uncond(step, num_steps, batch).to("cpu", torch.bool)
        n_active = int(active.sum())
        stats.scales.append(scale)

        # One forward over the conditional rows and the unconditional rows still needed.
        if n_active == batch:
            out = self._original_forward(*args, **kwargs)
            pred = _prediction_of(out)
            cond = pred[cond_rows]
            uncond_active = pred[uncond_start : uncond_start + batch]
        else:
            if n_active == 0:
                rows: slice | Tensor = cond_rows
            else:
                uncond_idx = active.nonzero().flatten() + uncond_start
                cond_idx = torch.arange(cond_rows.start, cond_rows.stop)
                rows = torch.cat([uncond_idx, cond_idx])
            sub_args = tuple(_take_rows(a, rows, full) for a in args)
            sub_kwargs = {k: v if k in _NOT_BATCHED else _take_rows(v, rows, full) for k, v in kwargs.items()}
            out = self._original_forward(*sub_args, **sub_kwargs)
            pred = _prediction_of(out)
            cond = pred[n_active:] if n_active else pred
            uncond_active = pred[:n_active]
        stats.forward_calls += 1
        stats.cond_rows += batch
        stats.uncond_rows += n_active
        stats.uncond_skipped += batch - n_active

        x = sample[cond_rows]
        channels = x.shape[1] if x.ndim > 1 else None
        extra_channels = None
        if channels is not None and cond.ndim > 1 and cond.shape[1] == 2 * channels:
            # Learned variance (DiT, IF): guide the first half of the channels, keep cond's variance.
            extra_channels = cond[:, channels:]
            cond, uncond_active = cond[:, :channels], uncond_active[:, :channels]

        if n_active == batch:
            uncond = uncond_active
        elif n_active:
            uncond = cond.clone()
            uncond[active.to(cond.device)] = uncond_active
        else:
            uncond = None

        if self.adaptive is not None and n_active:
            self.adaptive.update(
                step, cond[active.to(cond.device)] if n_active < batch else cond, uncond_active, active
            )
            stats.passed_at = list(getattr(self.adaptive, "passed_at", stats.passed_at))

        if self.mode == "cfgpp":
            guided = self._cfgpp_prepare(scheduler, x, cond, uncond, active, scale, level, step)
        elif not needs:
            guided = self.guider(cond, None, step=step, num_steps=num_steps, sigma=sigma)
        elif n_active == 0:
            guided = cond
        else:
            prediction_type = self._prediction_type(scheduler) if self.guider.space == "x0" else None
            if self.guider.space == "x0" and level is None:
                raise ValueError(
                    f"{type(self.guider).__name__} acts on x0, but the noise level of {type(scheduler).__name__} "
                    f"at step {step} is unknown (it exposes neither `sigmas` nor `alphas_cumprod`)."
                )
            guided = guide(
                self.guider,
                cond,
                uncond,
                step=step,
                num_steps=num_steps,
                sigma=sigma,
                sample=x,
                prediction_type=prediction_type,
                noise_level=level,
            )
            if n_active < batch:
                mask = active.to(cond.device).reshape(-1, *([1] * (cond.ndim - 1)))
                guided = torch.where(mask, guided, cond)
        if extra_channels is not None:
            guided = torch.cat([guided, extra_channels], dim=1)
        return _with_prediction(out, torch.cat([guided, guided]))

    def _passthrough(self, args: tuple, kwargs: dict, sample: Any, *, count_step: bool) -> Any:
        if count_step:
            scheduler = self.pipe.scheduler
            bound_t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            self._step_of(scheduler, bound_t)
            do_cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
            if do_cfg is False:
                scale = getattr(self.pipe, "_guidance_scale", None)
                self._warn_once(
                    "no-cfg",
                    f"{type(self.pipe).__name__} is not doing classifier-free guidance in this run "
                    f"(guidance_scale={scale!r} <= 1), so the attached guider never sees an unconditional "
                    "prediction. Pass any guidance_scale > 1 to the pipeline: the attached guider sets the scale.",
                )
            else:
                self._warn_once(
                    "no-batch",
                    f"The denoiser input of {type(self.pipe).__name__} is not a stacked [uncond, cond] batch "
                    "(two equal halves of latents); this call is left unguided.",
                )
        if isinstance(sample, Tensor):
            self.stats.passthrough_rows += sample.shape[0]
            self.stats.forward_calls += 1
        return self._original_forward(*args, **kwargs)

    # ----------------------------------------------------------------- CFG++
    def _cfgpp_prepare(
        self,
        scheduler: Any,
        x: Tensor,
        cond: Tensor,
        uncond: Tensor | None,
        active: Tensor,
        scale: float,
        level: NoiseLevel | None,
        step: int,
    ) -> Tensor:
        self._patch_scheduler(scheduler)
        if level is None:
            raise ValueError(
                f"CFG++ cannot find the noise level of {type(scheduler).__name__} at step {step}."
            )
        uncond = cond if uncond is None else uncond
        prediction_type = self._prediction_type(scheduler)
        x0_c = to_x0(cond, x, prediction_type, level)
        x0_u = to_x0(uncond, x, prediction_type, level)
        x0_hat = cfg(x0_c, x0_u, scale)
        guided = cfg(cond, uncond, scale)
        if not bool(active.all()):
            mask = active.to(cond.device).reshape(-1, *([1] * (cond.ndim - 1)))
            x0_hat = torch.where(mask, x0_hat, x0_c)
            x0_u = torch.where(mask, x0_u, x0_c)
            guided = torch.where(mask, guided, cond)
        self._cfgpp_state = {"denoised": x0_hat, "uncond_denoised": x0_u, "step": step}
        return guided

    def _patch_scheduler(self, scheduler: Any) -> None:
        if scheduler is self._patched_scheduler:
            return
        _check_cfgpp_scheduler(scheduler)
        self._unpatch_scheduler()
        self._patched_scheduler = scheduler
        self._original_step = scheduler.step
        self._had_instance_step = "step" in scheduler.__dict__
        self._step_signature = inspect.signature(self._original_step)
        scheduler.step = _delegate(self._cfgpp_step, self._original_step)

    def _unpatch_scheduler(self) -> None:
        scheduler = self._patched_scheduler
        if scheduler is None:
            return
        if self._had_instance_step:
            scheduler.step = self._original_step
        else:
            scheduler.__dict__.pop("step", None)
        self._patched_scheduler = None
        self._original_step = None

    def _cfgpp_step(
        self, model_output: Tensor, timestep: Any, sample: Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        state, self._cfgpp_state = self._cfgpp_state, None
        scheduler = self._patched_scheduler
        if state is None:  # not a guided step (the pipeline skipped CFG): the scheduler's own update
            return self._original_step(model_output, timestep, sample, *args, **kwargs)
        options = self._step_signature.bind(model_output, timestep, sample, *args, **kwargs)
        options.apply_defaults()
        opts = options.arguments
        name = type(scheduler).__name__
        if opts.get("s_churn", 0.0) or opts.get("per_token_timesteps") is not None:
            raise ValueError(
                f"CFG++ replaces {name}.step and supports neither `s_churn` > 0 nor per-token timesteps."
            )
        denoised, uncond_denoised = state["denoised"], state["uncond_denoised"]
        if sample.shape[0] != denoised.shape[0] and sample.shape[0] % denoised.shape[0] == 0:
            repeats = sample.shape[0] // denoised.shape[0]  # pipelines that step both CFG halves (DiT)
            denoised, uncond_denoised = (
                denoised.repeat(repeats, *[1] * (denoised.ndim - 1)),
                uncond_denoised.repeat(repeats, *[1] * (denoised.ndim - 1)),
            )
        eta, noise = 0.0, None
        generator = opts.get("generator")
        if name == "DDIMScheduler":
            t = int(timestep)
            prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            alpha_prod = float(scheduler.alphas_cumprod[t])
            alpha_prev = (
                float(scheduler.alphas_cumprod[prev_t])
                if prev_t >= 0
                else float(scheduler.final_alpha_cumprod)
            )
            level, next_level = NoiseLevel.ddpm(alpha_prod), NoiseLevel.ddpm(alpha_prev)
            if scheduler.config.clip_sample:
                r = scheduler.config.clip_sample_range
                denoised = denoised.clamp(-r, r)
            eta = float(opts.get("eta") or 0.0)
            if eta > 0:
                noise = opts.get("variance_noise")
        else:
            if scheduler.step_index is None:
                scheduler._init_step_index(timestep)
            index = scheduler.step_index
            sigma, sigma_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
            if name == "FlowMatchEulerDiscreteScheduler":
                level, next_level = NoiseLevel.flow_matching(sigma), NoiseLevel.flow_matching(sigma_next)
            else:
                level, next_level = NoiseLevel.karras(sigma), NoiseLevel.karras(sigma_next)
            if name == "EulerAncestralDiscreteScheduler":
                eta = 1.0
        if eta > 0 and noise is None:
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
        prev_sample = cfgpp_step(sample, denoised, uncond_denoised, level, next_level, eta=eta, noise=noise)
        prev_sample = prev_sample.to(model_output.dtype)
        if name != "DDIMScheduler":
            scheduler._step_index += 1
        if not opts.get("return_dict", True):
            return (prev_sample, denoised)
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        return SchedulerOutput(prev_sample=prev_sample)


def _check_cfgpp_scheduler(scheduler: Any) -> None:
    name = type(scheduler).__name__
    if name not in CFGPP_SCHEDULERS:
        raise ValueError(
            f"CFG++ cannot drive {name}: it replaces the scheduler's step and supports {', '.join(CFGPP_SCHEDULERS)}. "
            f"Swap the scheduler, e.g. `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`."
        )
    config = scheduler.config
    if name == "DDIMScheduler" and config.get("thresholding"):
        raise ValueError(
            "CFG++ does not support DDIMScheduler with `thresholding=True` (dynamic thresholding)."
        )
    if name == "FlowMatchEulerDiscreteScheduler" and config.get("stochastic_sampling"):
        raise ValueError(
            "CFG++ does not support FlowMatchEulerDiscreteScheduler with `stochastic_sampling=True`."
        )
    scheduler_prediction_type(scheduler)


def attach(
    pipe: Any,
    guider: Guider | float | Schedule | None = None,
    *,
    adaptive: UncondPolicy | None = None,
    mode: str = "guide",
    prediction_type: str | None = None,
    order: str = "auto",
    denoiser: str | None = None,
) -> GuidanceHandle:
    """Attach a guidance configuration to a classic diffusers pipeline; returns a :class:`GuidanceHandle`.

    Args:
        pipe: any pipeline that runs its ``unet`` / ``transformer`` once per step on a stacked
            ``[uncond, cond]`` batch when ``guidance_scale > 1`` (StableDiffusion, SDXL, SD3, DiT,
            PixArt, the project's digits pipeline, ...).
        guider: a :class:`guidance.guiders.Guider` (with its schedule), a scale or a schedule
            (plain :class:`~guidance.guiders.CFG`), or ``None`` to keep the pipeline's own
            ``guidance_scale`` (useful with ``adaptive`` alone). In ``mode="cfgpp"`` its scale
            is CFG++'s ``lambda`` in ``[0, 1]`` and its operator is not used.
        adaptive: an :class:`~guidance.adaptive.AdaptiveGuidance` or
            :class:`~guidance.adaptive.RatioCutoff`: per-sample retirement of the unconditional branch.
        mode: ``"guide"`` (default) or ``"cfgpp"`` (CFG++: also replaces ``pipe.scheduler.step``;
            DDIM, Euler, Euler ancestral and flow-matching Euler schedulers).
        prediction_type: what the model predicts, if not the scheduler's ``prediction_type``
            (``"epsilon"``, ``"v_prediction"``, ``"sample"``, ``"flow_prediction"``). Needed only for
            x0-space guiders and CFG++.
        order: ``"uncond_first"`` (diffusers' text pipelines), ``"cond_first"`` (DiT) or ``"auto"``.
        denoiser: the component to wrap; default ``unet``, else ``transformer``.

    Raises ``ValueError`` before any work for an unknown mode/order/prediction type, a model that is
    guidance-distilled (``guidance_embeds`` / ``time_cond_proj_dim``), a scheduler that CFG++ or an
    x0-space guider cannot drive, and a pipeline that already has guidance attached. A pipeline
    run that does not do CFG (``guidance_scale <= 1``) warns and runs unguided.
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    if order not in ORDERS:
        raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")
    if getattr(pipe, "_guidance_handle", None) is not None:
        raise ValueError("This pipeline already has guidance attached; call `detach(pipe)` first.")
    name = _denoiser_name(pipe, denoiser)
    module = getattr(pipe, name)
    _check_not_distilled(module, name)
    guider = _as_guider(pipe, guider)
    if mode == "cfgpp" and (type(guider) is not CFG or guider.rescale):
        raise ValueError(
            f"mode='cfgpp' combines with CFG++'s own rule and takes only its lambda: pass a number, a schedule or "
            f"a plain CFG guider, got {guider!r}."
        )
    if getattr(guider, "needs_negative", False):
        raise ValueError(
            f"{type(guider).__name__} needs a third (negative-prompt) prediction per step, which classic pipelines "
            "do not batch; use it through a modular pipeline or a custom loop."
        )
    if adaptive is not None and not isinstance(adaptive, UncondPolicy):
        raise ValueError(
            f"`adaptive` must be an AdaptiveGuidance or RatioCutoff (reset/needs_uncond/update), got {adaptive!r}."
        )
    if prediction_type is not None:
        prediction_type = normalize_prediction_type(prediction_type)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise ValueError(f"{type(pipe).__name__} has no `scheduler`.")
    if mode == "cfgpp":
        _check_cfgpp_scheduler(scheduler)
    if mode == "cfgpp" or guider.space == "x0":
        if prediction_type is None:
            scheduler_prediction_type(scheduler)
        if getattr(scheduler, "sigmas", None) is None and getattr(scheduler, "alphas_cumprod", None) is None:
            raise ValueError(
                f"{type(guider).__name__} acts on x0 but {type(scheduler).__name__} exposes neither `sigmas` nor "
                "`alphas_cumprod`, so predictions cannot be converted; use a DDIM/Euler/DPM-Solver/flow-matching scheduler."
            )
    handle = GuidanceHandle(pipe, guider, adaptive, mode, prediction_type, order, name)
    handle._install()
    return handle


def detach(pipe: Any) -> None:
    """Remove the guidance attached by :func:`attach` (a no-op if there is none)."""
    handle = getattr(pipe, "_guidance_handle", None)
    if handle is not None:
        handle.detach()
