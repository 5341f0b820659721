"""Conversions between prediction types (eps / v / x0 / flow velocity) at one noise level.

A noise level describes the sample the denoiser sees as ``x_t = alpha * x0 + sigma * eps``:

* DDPM-style (variance-preserving) schedules: ``alpha = sqrt(alpha_cumprod)``, ``sigma = sqrt(1 - alpha_cumprod)``
  (:meth:`NoiseLevel.ddpm`). diffusers' k-diffusion-style schedulers (Euler, Heun, DPM-Solver, ...)
  feed the denoiser the same VP form, with ``alpha_cumprod = 1 / (1 + sigma_k^2)``.
* Flow matching (SD3, Flux): ``x_t = (1 - sigma) x0 + sigma * noise``, velocity ``noise - x0``
  (:meth:`NoiseLevel.flow_matching`).
* Variance-exploding / k-diffusion's unscaled sample ``x0 + sigma * eps`` (:meth:`NoiseLevel.karras`).

Reading a level off a diffusers scheduler is the adapter's job (:mod:`guidance.diffusion.schedulers`);
this module knows nothing of diffusers.

Prediction types use diffusers' names: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` (x0) and
``"flow_prediction"`` (aliases ``"eps"``, ``"v"``, ``"x0"``, ``"flow"``). ``v`` is the
variance-preserving velocity ``(alpha * eps - sigma * x0) / sqrt(alpha^2 + sigma^2)`` (Salimans & Ho),
which is diffusers' definition for both VP samples and Euler's unscaled ones.

Example:
    >>> import torch
    >>> from guidance.spaces import NoiseLevel, from_x0, to_x0
    >>> x0, eps = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    >>> level = NoiseLevel.flow_matching(0.25)
    >>> x_t = 0.75 * x0 + 0.25 * eps
    >>> to_x0(eps - x0, x_t, "flow_prediction", level)
    tensor([ 1., -2.])
    >>> from_x0(x0, x_t, "epsilon", level)
    tensor([0.5000, 0.2500])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PREDICTION_TYPES",
    "NoiseLevel",
    "normalize_prediction_type",
    "to_x0",
    "from_x0",
    "convert",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
_ALIASES = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v_prediction": "v_prediction",
    "v": "v_prediction",
    "sample": "sample",
    "x0": "sample",
    "flow_prediction": "flow_prediction",
    "flow": "flow_prediction",
}

Level = float | Tensor


def normalize_prediction_type(prediction_type: str) -> str:
    """diffusers' name for ``prediction_type``; ``ValueError`` listing the valid names otherwise."""
    if not isinstance(prediction_type, str) or prediction_type not in _ALIASES:
        raise ValueError(
            f"`prediction_type` must be one of {PREDICTION_TYPES} (or the aliases eps, v, x0, flow), "
            f"got {prediction_type!r}."
        )
    return _ALIASES[prediction_type]


def _check_unit_interval(value: Level, name: str) -> None:
    if isinstance(value, Tensor):
        ok = bool(torch.isfinite(value).all()) and bool(((value >= 0) & (value <= 1)).all())
    else:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")


def _check_non_negative(value: Level, name: str) -> None:
    if isinstance(value, Tensor):
        ok = bool(torch.isfinite(value).all()) and bool((value >= 0).all())
    else:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value < math.inf
    if not ok:
        raise ValueError(f"`{name}` must be finite and >= 0, got {value!r}.")


def _sqrt(value: Level) -> Level:
    return value.sqrt() if isinstance(value, Tensor) else math.sqrt(value)


@dataclass(frozen=True)
class NoiseLevel:
    """``x_t = alpha * x0 + sigma * eps`` for the sample the denoiser sees; floats or ``(B,)`` tensors.

    ``is_flow`` marks a flow-matching path (``alpha = 1 - sigma``), the only one on which the
    ``"flow_prediction"`` velocity is defined.
    """

    alpha: Level
    sigma: Level
    is_flow: bool = False

    @classmethod
    def ddpm(cls, alpha_cumprod: Level) -> NoiseLevel:
        """Variance-preserving level from ``alpha_cumprod`` (``alphas_cumprod[t]``) at the current timestep."""
        _check_unit_interval(alpha_cumprod, "alpha_cumprod")
        return cls(_sqrt(alpha_cumprod), _sqrt(1 - alpha_cumprod))

    @classmethod
    def flow_matching(cls, sigma: Level) -> NoiseLevel:
        """Rectified-flow level ``x_t = (1 - sigma) x0 + sigma * noise`` (SD3's ``scheduler.sigmas[i]``)."""
        _check_unit_interval(sigma, "sigma")
        return cls(1 - sigma, sigma, is_flow=True)

    @classmethod
    def karras(cls, sigma: Level) -> NoiseLevel:
        """Variance-exploding level ``x_t = x0 + sigma * eps`` (k-diffusion's unscaled sample)."""
        _check_non_negative(sigma, "sigma")
        return cls(torch.ones_like(sigma) if isinstance(sigma, Tensor) else 1.0, sigma)


def _coefficients(level: NoiseLevel, like: Tensor) -> tuple[Level, Level]:
    if not isinstance(level, NoiseLevel):
        raise ValueError(
            f"`noise_level` must be a guidance.spaces.NoiseLevel (e.g. NoiseLevel.ddpm(alpha_cumprod)), got {level!r}."
        )

    def shaped(value: Level) -> Level:
        if not isinstance(value, Tensor):
            return float(value)
        value = value.to(device=like.device, dtype=like.dtype)
        if value.ndim == 1 and like.ndim > 1:
            value = value.reshape(-1, *([1] * (like.ndim - 1)))
        return value

    return shaped(level.alpha), shaped(level.sigma)


def _any_zero(value: Level) -> bool:
    return bool((value == 0).any()) if isinstance(value, Tensor) else value == 0


def _prepare(pred: Tensor, sample: Tensor, prediction_type: str, level: NoiseLevel | None):
    prediction_type = normalize_prediction_type(prediction_type)
    if level is None:
        raise ValueError(
            "The scheduler state is missing: pass `noise_level` (NoiseLevel.ddpm(alpha_cumprod), "
            "NoiseLevel.flow_matching(sigma), NoiseLevel.karras(sigma); for a diffusers scheduler, "
            "guidance.diffusion.schedulers.noise_level(scheduler, timestep))."
        )
    if pred.shape != sample.shape:
        raise ValueError(
            f"prediction and `sample` shapes differ: {tuple(pred.shape)} vs {tuple(sample.shape)}."
        )
    if prediction_type == "flow_prediction" and not level.is_flow:
        raise ValueError(
            "`prediction_type='flow_prediction'` needs a flow-matching level (NoiseLevel.flow_matching)."
        )
    if prediction_type == "v_prediction" and level.is_flow:
        raise ValueError(
            "`prediction_type='v_prediction'` is the variance-preserving velocity; flow-matching models "
            "predict 'flow_prediction'."
        )
    dtype = torch.promote_types(pred.dtype, torch.float32)
    alpha, sigma = _coefficients(level, pred.to(dtype))
    return prediction_type, dtype, alpha, sigma


def to_x0(pred: Tensor, sample: Tensor, prediction_type: str, noise_level: NoiseLevel | None) -> Tensor:
    """The denoised estimate x0 from a model prediction of ``prediction_type`` at ``sample = x_t``.

    Computed in float32 at least, returned in ``pred``'s dtype. Raises ``ValueError`` where the
    conversion is singular (eps at ``alpha = 0``: pure noise carries no x0 information).
    """
    prediction_type, dtype, alpha, sigma = _prepare(pred, sample, prediction_type, noise_level)
    if prediction_type == "sample":
        return pred
    p, x = pred.to(dtype), sample.to(dtype)
    if prediction_type == "epsilon":
        if _any_zero(alpha):
            raise ValueError(
                "Cannot convert an eps prediction to x0 at alpha = 0 (pure noise, alpha_cumprod = 0)."
            )
        x0 = (x - sigma * p) / alpha
    elif prediction_type == "v_prediction":
        r2 = alpha * alpha + sigma * sigma
        r = r2.sqrt() if isinstance(r2, Tensor) else math.sqrt(r2)
        x0 = (alpha * x - sigma * r * p) / r2
    else:
        x0 = x - sigma * p
    return x0.to(pred.dtype)


def from_x0(x0: Tensor, sample: Tensor, prediction_type: str, noise_level: NoiseLevel | None) -> Tensor:
    """The prediction of ``prediction_type`` whose x0 (at ``sample = x_t``) is ``x0``: inverse of :func:`to_x0`.

    Raises ``ValueError`` at ``sigma = 0`` for eps, v and flow velocity (no noise left to predict).
    """
    prediction_type, dtype, alpha, sigma = _prepare(x0, sample, prediction_type, noise_level)
    if prediction_type == "sample":
        return x0
    if _any_zero(sigma):
        raise ValueError(
            f"Cannot convert x0 to a {prediction_type!r} prediction at sigma = 0 (no noise left)."
        )
    d, x = x0.to(dtype), sample.to(dtype)
    if prediction_type == "epsilon":
        out = (x - alpha * d) / sigma
    elif prediction_type == "v_prediction":
        r2 = alpha * alpha + sigma * sigma
        r = r2.sqrt() if isinstance(r2, Tensor) else math.sqrt(r2)
        out = (alpha * x - r2 * d) / (sigma * r)
    else:
        out = (x - d) / sigma
    return out.to(x0.dtype)


def convert(
    pred: Tensor, sample: Tensor, from_type: str, to_type: str, noise_level: NoiseLevel | None
) -> Tensor:
    """A prediction of ``from_type`` as one of ``to_type`` (through x0); returns ``pred`` when the types match."""
    if normalize_prediction_type(from_type) == normalize_prediction_type(to_type):
        return pred
    return from_x0(to_x0(pred, sample, from_type, noise_level), sample, to_type, noise_level)
