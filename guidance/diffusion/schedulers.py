"""What a diffusers scheduler says about its noise levels: scheduler inspection for the diffusers adapter.

The math of noise levels and prediction types is in :mod:`guidance.spaces` (pure tensors); this
module reads a diffusers scheduler through its public attributes (``config``, ``sigmas``,
``alphas_cumprod``, ``timesteps``, ``step_index``, ``begin_index``, ``index_for_timestep``) and
hands :class:`~guidance.spaces.NoiseLevel` objects to the core.

* :func:`is_flow_matching`: a flow-matching scheduler (SD3, Flux) by class (``isinstance`` against
  diffusers' ``FlowMatch*`` schedulers) or by config (``use_flow_sigmas``, ``prediction_type``).
* :func:`prediction_type`: what the model predicts.
* :func:`noise_level`: the level of the denoiser's *input* (after ``scale_model_input``) at a
  timestep or step index; :func:`noise_level_at` is the tolerant form (``None`` when unknown).
* :func:`step_noise_levels`: the levels of the sample a scheduler's ``step`` receives and returns
  (CFG++ replaces ``step`` and needs them).
* :func:`schedule_sigma`: the ``sigma`` handed to :mod:`guidance.schedules` (flow sigma for flow
  matching, k-diffusion sigma ``sigma / alpha`` otherwise).

Example:
    >>> from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
    >>> from guidance.diffusion.schedulers import is_flow_matching, noise_level, schedule_sigma
    >>> is_flow_matching(FlowMatchEulerDiscreteScheduler()), is_flow_matching(DDIMScheduler())
    (True, False)
    >>> scheduler = DDIMScheduler()
    >>> scheduler.set_timesteps(10)
    >>> level = noise_level(scheduler, scheduler.timesteps[0])
    >>> round(schedule_sigma(level), 2)  # sqrt((1 - a) / a) at t = 900
    60.82
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import torch
from torch import Tensor

from guidance.spaces import NoiseLevel, normalize_prediction_type

__all__ = [
    "is_flow_matching",
    "prediction_type",
    "step_index",
    "noise_level",
    "noise_level_at",
    "step_noise_levels",
    "schedule_sigma",
    "num_steps",
]

_FLOW_MATCH_SCHEDULERS = (
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "FlowMatchLCMScheduler",
)


@cache
def diffusers_classes(names: tuple[str, ...]) -> tuple[type, ...]:
    """The diffusers classes of these names that this diffusers version has (for ``isinstance``)."""
    import diffusers

    return tuple(cls for cls in (getattr(diffusers, name, None) for name in names) if isinstance(cls, type))


def _config(scheduler: Any) -> Any:
    return getattr(scheduler, "config", None) or {}


def is_flow_matching(scheduler: Any) -> bool:
    """Whether ``scheduler`` samples a flow-matching path ``x_t = (1 - sigma) x0 + sigma noise``."""
    config = _config(scheduler)
    return (
        isinstance(scheduler, diffusers_classes(_FLOW_MATCH_SCHEDULERS))
        or bool(config.get("use_flow_sigmas", False))
        or config.get("prediction_type") == "flow_prediction"
    )


def prediction_type(scheduler: Any) -> str:
    """What the model of ``scheduler`` predicts: its config's ``prediction_type``, or ``"flow_prediction"``."""
    if is_flow_matching(scheduler):
        return "flow_prediction"
    value = _config(scheduler).get("prediction_type")
    if value is None:
        raise ValueError(f"{type(scheduler).__name__} has no `prediction_type` in its config.")
    return normalize_prediction_type(value)


def num_steps(scheduler: Any) -> int | None:
    """The number of timesteps of the current run (``len(scheduler.timesteps)``), or ``None``."""
    timesteps = getattr(scheduler, "timesteps", None)
    return len(timesteps) if timesteps is not None else None


def _scalar_timestep(timestep: float | Tensor) -> float:
    if isinstance(timestep, Tensor):
        flat = timestep.flatten()
        if flat.numel() == 0 or not bool((flat == flat[0]).all()):
            raise ValueError(f"`timestep` must hold one value for the whole batch, got {timestep!r}.")
        return float(flat[0])
    return float(timestep)


def step_index(scheduler: Any, timestep: float | Tensor | None = None) -> int | None:
    """The index into ``scheduler.sigmas`` of the current step, through public attributes only.

    ``scheduler.step_index`` once the scheduler has started; before that ``begin_index`` (set by
    img2img pipelines) or ``index_for_timestep(timestep)``, which is what the scheduler itself does
    on its first ``step``. ``None`` when the scheduler keeps no step index (DDIM, DDPM).
    """
    index = getattr(scheduler, "step_index", None)
    if isinstance(index, int):
        return index
    begin = getattr(scheduler, "begin_index", None)
    if isinstance(begin, int):
        return begin
    if timestep is None or not hasattr(scheduler, "index_for_timestep"):
        return None
    t = timestep if isinstance(timestep, Tensor) else torch.tensor(timestep)
    return int(scheduler.index_for_timestep(t.flatten()[0].to(scheduler.timesteps.device)))


def _sigma(scheduler: Any, timestep: Any, index: int | None) -> float | None:
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or len(sigmas) == 0:
        return None
    if index is None:
        index = step_index(scheduler, timestep)
    return None if index is None else float(sigmas[int(index)])


def noise_level(
    scheduler: Any, timestep: float | Tensor | None = None, index: int | None = None
) -> NoiseLevel:
    """The noise level of the denoiser's input at ``timestep`` (or step ``index``).

    The denoiser's input is what the pipeline passes to the UNet/transformer, after
    ``scheduler.scale_model_input``: variance preserving for DDPM-style models
    (``alpha_cumprod = 1 / (1 + sigma_k^2)`` where the scheduler keeps k-diffusion sigmas),
    ``(1 - sigma) x0 + sigma noise`` for flow matching. Raises ``ValueError`` when the scheduler
    does not say.
    """
    if is_flow_matching(scheduler):
        sigma = _sigma(scheduler, timestep, index)
        if sigma is None and timestep is not None:
            sigma = _scalar_timestep(timestep) / float(_config(scheduler).get("num_train_timesteps", 1000))
        if sigma is None:
            raise ValueError(
                f"Cannot find the noise level of {type(scheduler).__name__}: pass `timestep` or `index` "
                "(call `set_timesteps` first)."
            )
        return NoiseLevel.flow_matching(min(max(sigma, 0.0), 1.0))
    sigma = _sigma(scheduler, timestep, index)
    if sigma is not None:
        return NoiseLevel.ddpm(1.0 / (1.0 + sigma**2))
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None or timestep is None:
        raise ValueError(
            f"Cannot find the noise level of {type(scheduler).__name__} at timestep {timestep!r}: it needs "
            "`alphas_cumprod` and a `timestep`, or `sigmas` and a step index."
        )
    t = _scalar_timestep(timestep)
    if not (0 <= t < len(alphas_cumprod)) or t != int(t):
        raise ValueError(f"`timestep` must be an integer in [0, {len(alphas_cumprod)}), got {timestep!r}.")
    return NoiseLevel.ddpm(float(alphas_cumprod[int(t)]))


def noise_level_at(scheduler: Any, timestep: Any, index: int | None) -> NoiseLevel | None:
    """:func:`noise_level`, or ``None`` when the scheduler does not say."""
    try:
        return noise_level(scheduler, timestep=timestep, index=index)
    except (ValueError, IndexError, TypeError, RuntimeError):
        return None


def schedule_sigma(level: NoiseLevel | None) -> float | None:
    """The noise level handed to schedules: flow sigma for flow matching, else ``sigma / alpha`` (k-diffusion sigma)."""
    if level is None:
        return None
    if level.is_flow:
        return float(level.sigma)
    alpha = float(level.alpha)
    return math.inf if alpha == 0 else float(level.sigma) / alpha


def step_noise_levels(scheduler: Any, timestep: Any, index: int | None) -> tuple[NoiseLevel, NoiseLevel]:
    """``(level, next_level)`` of the sample that ``scheduler.step`` receives and returns.

    DDIM steps variance-preserving samples from ``alphas_cumprod[t]`` to ``alphas_cumprod[t - T / N]``
    (``final_alpha_cumprod`` past the end), as its ``step`` does; Euler-type schedulers step
    k-diffusion's unscaled sample ``x0 + sigma n`` from ``sigmas[i]`` to ``sigmas[i + 1]``;
    flow-matching ones the flow sample. ``index`` is the step index (:func:`step_index`).
    """
    if is_flow_matching(scheduler) or getattr(scheduler, "sigmas", None) is not None:
        if index is None:
            raise ValueError(f"{type(scheduler).__name__} has no step index at timestep {timestep!r}.")
        sigma, sigma_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
        make = NoiseLevel.flow_matching if is_flow_matching(scheduler) else NoiseLevel.karras
        return make(sigma), make(sigma_next)
    t = int(_scalar_timestep(timestep))
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prev = (
        float(scheduler.alphas_cumprod[prev_t]) if prev_t >= 0 else float(scheduler.final_alpha_cumprod)
    )
    return NoiseLevel.ddpm(float(scheduler.alphas_cumprod[t])), NoiseLevel.ddpm(alpha_prev)
