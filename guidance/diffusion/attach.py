"""Guidance for classic diffusers pipelines: wrap the denoiser, not the pipeline.

:func:`attach` replaces ``pipe.unet.forward`` (or ``pipe.transformer.forward``) with a
:class:`~guidance.diffusion.wrapper.DenoiserWrapper` that sees the stacked ``[uncond, cond]``
batch the pipeline builds when it does classifier-free guidance, evaluates the branches the
guider asks for (:mod:`guidance.diffusion.branches`), combines them with the guider and returns
``[g, g]``, so the pipeline's own ``u + w (c - u)`` gives back ``g`` exactly. :func:`detach`
(or leaving the ``with`` block, also on an exception) restores the denoiser and the scheduler.

The pipeline must still do CFG (``guidance_scale > 1``; its value no longer matters) so that it
builds the unconditional batch; the attached guider decides the rest. With ``mode="cfgpp"`` the
scheduler's ``step`` is replaced too (:mod:`guidance.diffusion.cfgpp`).

Schedules receive ``sigma`` in the scheduler's own convention
(:func:`~guidance.diffusion.schedulers.schedule_sigma`): the k-diffusion sigma
``sqrt((1 - alpha_cumprod) / alpha_cumprod)`` for DDPM-style models and the flow-matching sigma
in ``[0, 1]`` for SD3/Flux.

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

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

from guidance.adaptive import UncondPolicy
from guidance.diffusion.batch import flatten_inputs
from guidance.diffusion.branches import BranchEvaluator, as_evaluator
from guidance.diffusion.cfgpp import check_cfgpp_scheduler
from guidance.diffusion.patching import InstancePatch
from guidance.diffusion.schedulers import prediction_type as scheduler_prediction_type
from guidance.diffusion.stats import GuidanceStats
from guidance.diffusion.wrapper import DenoiserWrapper
from guidance.guiders import CFG, Guider
from guidance.schedules import Schedule
from guidance.spaces import normalize_prediction_type
from guidance.validation import check_choice, check_tensor, is_real_number

__all__ = ["GuidanceHandle", "attach", "detach", "MODES", "ORDERS"]

MODES = ("guide", "cfgpp")
ORDERS = ("auto", "uncond_first", "cond_first")


class GuidanceHandle:
    """What :func:`attach` returns: the configuration, per-run statistics, and :meth:`detach`.

    Use it as a context manager to detach on exit. ``stats`` is the current (or last) run's
    :class:`~guidance.diffusion.stats.GuidanceStats`, ``runs`` all runs since attaching.
    ``evaluator`` (a :class:`~guidance.diffusion.branches.BranchEvaluator`) may be replaced
    between runs.
    """

    def __init__(self, pipe: Any, guider: Guider, config: dict[str, Any]):
        self.pipe, self.guider = pipe, guider
        self.adaptive: UncondPolicy | None = config["adaptive"]
        self.mode: str = config["mode"]
        self.prediction_type: str | None = config["prediction_type"]
        self.order: str = config["order"]
        self.denoiser_name: str = config["denoiser"]
        self.evaluator: BranchEvaluator = config["evaluator"]
        self.branch_inputs: dict[str, Mapping[str, Any]] = config["branch_inputs"]
        self.module = getattr(pipe, self.denoiser_name)
        self.runs: list[GuidanceStats] = []
        self.stats = GuidanceStats()
        self._wrapper = DenoiserWrapper(self, self.module.forward)
        self._patch: InstancePatch | None = None

    def _install(self) -> None:
        # One function object with the original signature: `detach` recognises it, and pipelines that
        # inspect `forward`'s parameters see the real ones.
        self._patch = InstancePatch(self.module, "forward", self._wrapper)
        if self.mode == "cfgpp":
            self._wrapper.cfgpp.install(self.pipe.scheduler)
        self.pipe._guidance_handle = self

    @property
    def attached(self) -> bool:
        return self._patch is not None

    def detach(self) -> None:
        """Restore the denoiser's ``forward`` (and the scheduler's ``step`` in CFG++ mode)."""
        patch, self._patch = self._patch, None
        if patch is None:
            return
        if not patch.intact:
            warnings.warn(
                f"`pipe.{self.denoiser_name}.forward` was replaced after `attach` (e.g. by offload hooks); "
                "it is restored to what it was before `attach`.",
                stacklevel=2,
            )
        patch.restore()
        self._wrapper.cfgpp.uninstall()
        close = getattr(self.evaluator, "close", None)  # a distributed evaluator's own process group
        if callable(close):
            close()
        if getattr(self.pipe, "_guidance_handle", None) is self:
            del self.pipe._guidance_handle

    def reset(self) -> None:
        """Start a new run at the next call (the wrapper also does this whenever ``set_timesteps`` runs)."""
        self._wrapper.steps.reset()

    def __enter__(self) -> GuidanceHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (
            f"GuidanceHandle({type(self.pipe).__name__}.{self.denoiser_name}, guider={self.guider!r}, "
            f"adaptive={self.adaptive!r}, mode={self.mode!r}, evaluator={self.evaluator!r})"
        )


# ------------------------------------------------------------------------------ validation
def _denoiser_name(pipe: Any, denoiser: str | None) -> str:
    if denoiser is not None:
        if not isinstance(denoiser, str):
            raise TypeError(f"`denoiser` must be a component name (str), got {type(denoiser).__name__}.")
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


class _PipelineScale:
    """Schedule that reads the pipeline's own ``guidance_scale`` at every step (``attach(pipe)`` without a guider)."""

    def __init__(self, pipe: Any):
        self.pipe = pipe

    def __call__(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        scale = getattr(self.pipe, "guidance_scale", None)
        if not is_real_number(scale):
            raise ValueError(
                f"{type(self.pipe).__name__} does not expose its guidance scale (`guidance_scale`); "
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
    if is_real_number(guider) or (callable(guider) and not isinstance(guider, (bool, str))):
        return CFG(guider)
    raise TypeError(
        f"`guider` must be a guidance.guiders.Guider, a scale or a schedule, got {type(guider).__name__}."
    )


def _check_guider(guider: Guider, mode: str, branch_inputs: Mapping[str, Any]) -> None:
    if mode == "cfgpp" and (type(guider) is not CFG or guider.rescale):
        raise ValueError(
            f"mode='cfgpp' combines with CFG++'s own rule and takes only its lambda: pass a number, a schedule or "
            f"a plain CFG guider, got {guider!r}."
        )
    if getattr(guider, "needs_negative", False) and "negative" not in branch_inputs:
        raise ValueError(
            f"{type(guider).__name__} needs a third, negative-prompt prediction per step: pass its denoiser inputs, "
            "e.g. `attach(pipe, guider, branch_inputs={'negative': prompt_inputs(pipe, 'blurry')})` (class "
            "labels for class-conditional models: `{'negative': {'class_labels': torch.tensor([3])}}`), and call "
            "the pipeline without `negative_prompt` so that its unconditional rows are the empty prompt."
        )


def _check_branch_inputs(branch_inputs: Any, module: Any) -> dict[str, Mapping[str, Any]]:
    if branch_inputs is None:
        return {}
    if not isinstance(branch_inputs, Mapping):
        raise TypeError(
            f"`branch_inputs` must map branch names to input mappings, got {type(branch_inputs).__name__}."
        )
    parameters = inspect.signature(module.forward).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for name, inputs in branch_inputs.items():
        label = f"`branch_inputs[{name!r}]`"
        if not isinstance(name, str) or not name.isidentifier() or name == "cond":
            raise ValueError(
                f"{label}: branch names are identifiers other than 'cond' (the pipeline's own rows)."
            )
        if not isinstance(inputs, Mapping) or not inputs:
            raise TypeError(
                f"{label} must be a non-empty mapping of denoiser argument names to tensors, got {inputs!r}."
            )
        unknown = [key for key in inputs if key not in parameters and not open_ended]
        if unknown:
            raise ValueError(
                f"{label}: {type(module).__name__}.forward has no argument {unknown}; it has {list(parameters)}."
            )
        for path, value in flatten_inputs(inputs).items():
            check_tensor(value, f"branch_inputs[{name!r}][{'.'.join(path)!r}]")
    return dict(branch_inputs)


def _check_scheduler(pipe: Any, guider: Guider, mode: str, prediction_type: str | None) -> None:
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise ValueError(f"{type(pipe).__name__} has no `scheduler`.")
    if mode == "cfgpp":
        check_cfgpp_scheduler(scheduler)
    if mode == "cfgpp" or guider.space == "x0":
        if prediction_type is None:
            scheduler_prediction_type(scheduler)
        if getattr(scheduler, "sigmas", None) is None and getattr(scheduler, "alphas_cumprod", None) is None:
            raise ValueError(
                f"{type(guider).__name__} acts on x0 but {type(scheduler).__name__} exposes neither `sigmas` nor "
                "`alphas_cumprod`, so predictions cannot be converted; use a DDIM/Euler/DPM-Solver/flow-matching scheduler."
            )


def _check_choices(mode: str, order: str, adaptive: Any) -> None:
    check_choice(mode, "mode", MODES)
    check_choice(order, "order", ORDERS)
    if adaptive is not None and not isinstance(adaptive, UncondPolicy):
        raise TypeError(
            f"`adaptive` must be an AdaptiveGuidance or RatioCutoff (reset/needs_uncond/update), got {adaptive!r}."
        )


# ------------------------------------------------------------------------------ public API
def attach(
    pipe: Any,
    guider: Guider | float | Schedule | None = None,
    *,
    adaptive: UncondPolicy | None = None,
    mode: str = "guide",
    prediction_type: str | None = None,
    order: str = "auto",
    denoiser: str | None = None,
    evaluator: str | BranchEvaluator = "batched",
    branch_inputs: Mapping[str, Mapping[str, Any]] | None = None,
    parallel: str | BranchEvaluator | None = None,
) -> GuidanceHandle:
    """Attach a guidance configuration to a classic diffusers pipeline; returns a :class:`GuidanceHandle`.

    Args:
        pipe: any pipeline that runs its ``unet`` / ``transformer`` once per step on a stacked
            ``[uncond, cond]`` batch when ``guidance_scale > 1`` (StableDiffusion, SDXL, SD3, DiT,
            PixArt, the project's digits pipeline, ...).
        guider (Guider | float | Schedule | None): a :class:`guidance.guiders.Guider` (with its
            schedule), a scale or a schedule (plain :class:`~guidance.guiders.CFG`), or ``None`` to
            keep the pipeline's own ``guidance_scale`` (useful with ``adaptive`` alone). In
            ``mode="cfgpp"`` its scale is CFG++'s ``lambda`` in ``[0, 1]``.
        adaptive (UncondPolicy | None): an :class:`~guidance.adaptive.AdaptiveGuidance` or
            :class:`~guidance.adaptive.RatioCutoff`: per-sample retirement of every branch but ``cond``.
        mode (str): ``"guide"`` (default) or ``"cfgpp"`` (CFG++: also replaces ``pipe.scheduler.step``;
            DDIM, Euler, Euler ancestral and flow-matching Euler schedulers).
        prediction_type (str | None): what the model predicts, if not the scheduler's
            (``"epsilon"``, ``"v_prediction"``, ``"sample"``, ``"flow_prediction"``); needed only
            for x0-space guiders and CFG++.
        order (str): ``"uncond_first"`` (diffusers' text pipelines), ``"cond_first"`` (DiT) or ``"auto"``.
        denoiser (str | None): the component to wrap; default ``unet``, else ``transformer``.
        evaluator (str | BranchEvaluator): how branches become denoiser calls: ``"batched"``
            (default; one call where possible, bit-identical to the pipeline for plain CFG),
            ``"separate"`` (one call per branch) or an object with ``evaluate(requests)``.
        branch_inputs (Mapping[str, Mapping[str, Tensor]] | None): denoiser inputs of extra
            branches by branch name, e.g. ``{"negative": {"encoder_hidden_states": embeds}}``
            for :class:`~guidance.guiders.PerpNeg` (:func:`~guidance.diffusion.prompt_inputs`
            builds them from a prompt). Tensors have 1 row or one per sample.
        parallel (str | DistributedEvaluator | None): ``"cfg"`` splits every step's branches across
            the ranks of the process group (launch with ``torchrun --nproc-per-node 2``; see
            :mod:`guidance.diffusion.parallel`), or a configured
            :class:`~guidance.diffusion.parallel.DistributedEvaluator`. Every rank returns the same
            images. ``None`` (default): one process.

    Raises ``ValueError`` (``TypeError`` for wrong types) before any work for an unknown mode,
    order or prediction type, a guidance-distilled model (``guidance_embeds`` /
    ``time_cond_proj_dim``), a scheduler that CFG++ or an x0-space guider cannot drive, missing
    or malformed branch inputs, and a pipeline that already has guidance attached. A pipeline run
    that does not do CFG (``guidance_scale <= 1``) warns and runs unguided.
    """
    _check_choices(mode, order, adaptive)
    if getattr(pipe, "_guidance_handle", None) is not None:
        raise ValueError("This pipeline already has guidance attached; call `detach(pipe)` first.")
    name = _denoiser_name(pipe, denoiser)
    module = getattr(pipe, name)
    _check_not_distilled(module, name)
    guider = _as_guider(pipe, guider)
    inputs = _check_branch_inputs(branch_inputs, module)
    _check_guider(guider, mode, inputs)
    if callable(getattr(guider, "check_denoiser", None)):  # e.g. NAG needs cross-attention layers
        guider.check_denoiser(module)
    if prediction_type is not None:
        prediction_type = normalize_prediction_type(prediction_type)
    _check_scheduler(pipe, guider, mode, prediction_type)
    if parallel is not None:  # last: it joins the other ranks (a collective) once everything else is valid
        from guidance.diffusion.parallel import parallel_evaluator

        evaluator = parallel_evaluator(
            parallel, evaluator, module=module, guider=guider, mode=mode, branch_inputs=inputs
        )
    config = {
        "adaptive": adaptive,
        "mode": mode,
        "prediction_type": prediction_type,
        "order": order,
        "denoiser": name,
        "evaluator": as_evaluator(evaluator),
        "branch_inputs": inputs,
    }
    handle = GuidanceHandle(pipe, guider, config)
    handle._install()
    return handle


def detach(pipe: Any) -> None:
    """Remove the guidance attached by :func:`attach` (a no-op if there is none)."""
    handle = getattr(pipe, "_guidance_handle", None)
    if handle is not None:
        handle.detach()
