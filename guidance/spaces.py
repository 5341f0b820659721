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
from typing import Any

import torch
from torch import Tensor

from guidance.tensors import float64_device, per_sample, pow2_exponent, saturate, work_dtype
from guidance.validation import check_bool, check_range, check_same_shape, check_tensor, check_tensor_range

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
    """diffusers' name for ``prediction_type``; ``ValueError`` listing the valid names otherwise.

    Args:
        prediction_type (str): one of :data:`PREDICTION_TYPES` or an alias (``eps``, ``v``, ``x0``, ``flow``).

    Example:
        >>> from guidance.spaces import normalize_prediction_type
        >>> normalize_prediction_type("eps")
        'epsilon'
    """
    if not isinstance(prediction_type, str) or prediction_type not in _ALIASES:
        raise ValueError(
            f"`prediction_type` must be one of {PREDICTION_TYPES} (or the aliases eps, v, x0, flow), "
            f"got {prediction_type!r}."
        )
    return _ALIASES[prediction_type]


def _check_level(value: Any, name: str, hi: float = math.inf) -> Level:
    """A number in ``[0, hi]`` (finite), or a floating tensor of shape ``()``, ``(B,)`` or ``(B, 1, ..., 1)``
    whose values are (one device sync: noise levels are checked where they enter, once per step)."""
    if not isinstance(value, Tensor):
        return check_range(value, name, 0.0, hi, hi_open=math.isinf(hi))
    check_tensor(value, name, floating=True)
    if value.ndim > 1 and any(size != 1 for size in value.shape[1:]):
        raise ValueError(
            f"`{name}` must be a number or a tensor of shape (), (B,) or (B, 1, ..., 1), got shape {tuple(value.shape)}."
        )
    return check_tensor_range(value, name, 0.0, hi)


def _sqrt(value: Level) -> Level:
    return value.sqrt() if isinstance(value, Tensor) else math.sqrt(value)


@dataclass(frozen=True)
class NoiseLevel:
    """``x_t = alpha * x0 + sigma * eps`` for the sample the denoiser sees; floats or ``(B,)`` tensors.

    ``is_flow`` marks a flow-matching path (``alpha = 1 - sigma``), the only one on which the
    ``"flow_prediction"`` velocity is defined.

    Args:
        alpha (float | Tensor): signal coefficient, a finite number ``>= 0`` or a floating tensor of
            shape ``()``, ``(B,)`` or ``(B, 1, ..., 1)`` of them (checked once, with a device sync).
        sigma (float | Tensor): noise coefficient, likewise.
        is_flow (bool): whether this is a flow-matching level.

    Example:
        >>> from guidance.spaces import NoiseLevel
        >>> NoiseLevel.ddpm(0.25)
        NoiseLevel(alpha=0.5, sigma=0.8660254037844386, is_flow=False)
        >>> NoiseLevel(float("nan"), 0.5)
        Traceback (most recent call last):
        ...
        ValueError: `alpha` must be a number in [0.0, inf), got nan.
    """

    alpha: Level
    sigma: Level
    is_flow: bool = False

    def __post_init__(self) -> None:
        check_bool(self.is_flow, "is_flow")
        object.__setattr__(self, "alpha", _check_level(self.alpha, "alpha"))
        object.__setattr__(self, "sigma", _check_level(self.sigma, "sigma"))

    @classmethod
    def ddpm(cls, alpha_cumprod: Level) -> NoiseLevel:
        """Variance-preserving level from ``alpha_cumprod`` (``alphas_cumprod[t]``, in ``[0, 1]``)."""
        alpha_cumprod = _check_level(alpha_cumprod, "alpha_cumprod", 1.0)
        return cls(_sqrt(alpha_cumprod), _sqrt(1 - alpha_cumprod))

    @classmethod
    def flow_matching(cls, sigma: Level) -> NoiseLevel:
        """Rectified-flow level ``x_t = (1 - sigma) x0 + sigma * noise`` (SD3's ``scheduler.sigmas[i]``, in ``[0, 1]``)."""
        sigma = _check_level(sigma, "sigma", 1.0)
        return cls(1 - sigma, sigma, is_flow=True)

    @classmethod
    def karras(cls, sigma: Level) -> NoiseLevel:
        """Variance-exploding level ``x_t = x0 + sigma * eps`` (k-diffusion's unscaled sample; ``sigma`` finite ``>= 0``)."""
        sigma = _check_level(sigma, "sigma")
        return cls(torch.ones_like(sigma) if isinstance(sigma, Tensor) else 1.0, sigma)


def _coefficients(level: NoiseLevel, like: Tensor) -> tuple[Level, Level]:
    """``alpha`` and ``sigma`` as Python floats or float64 ``(B, 1, ..., 1)`` tensors on ``like``'s device."""
    batch = like.shape[0] if like.ndim else 1

    def shaped(value: Level, name: str) -> Level:
        if not isinstance(value, Tensor):
            return float(value)
        if value.numel() not in (1, batch):
            raise ValueError(f"`noise_level.{name}` holds {value.numel()} values for a batch of {batch} samples.")
        return per_sample(value.to(device=float64_device(like), dtype=torch.float64), like)

    return shaped(level.alpha, "alpha"), shaped(level.sigma, "sigma")


def _mix(a: Level, x: Tensor, b: Level, y: Tensor, dtype: torch.dtype) -> Tensor:
    """``a x + b y`` in ``dtype`` with per-sample coefficients computed beforehand (in float64).

    It is linear, so it is evaluated on power-of-two-scaled copies (exact: the same bits wherever
    nothing overflows) and scaled back: terms that would overflow while their sum does not (large
    coefficients of opposite signs) give the right sum."""
    if isinstance(a, Tensor):
        a = a.to(device=x.device, dtype=dtype)
    if isinstance(b, Tensor):
        b = b.to(device=x.device, dtype=dtype)
    x, y = x.to(dtype), y.to(dtype)
    flat = torch.maximum(x.abs(), y.abs()).reshape(x.shape[0] if x.ndim else 1, -1)
    exponent = per_sample(pow2_exponent(flat, [1]), x)
    return torch.ldexp(a * torch.ldexp(x, -exponent) + b * torch.ldexp(y, -exponent), exponent)


def _any_zero(value: Level) -> bool:
    return bool((value == 0).any()) if isinstance(value, Tensor) else value == 0


def _prepare(pred: Tensor, sample: Tensor, prediction_type: str, level: NoiseLevel | None, name: str = "pred"):
    prediction_type = normalize_prediction_type(prediction_type)
    check_tensor(pred, name, floating=True)
    check_tensor(sample, "sample", floating=True)
    if level is None:
        raise ValueError(
            "The scheduler state is missing: pass `noise_level` (NoiseLevel.ddpm(alpha_cumprod), "
            "NoiseLevel.flow_matching(sigma), NoiseLevel.karras(sigma); for a diffusers scheduler, "
            "guidance.diffusion.schedulers.noise_level(scheduler, timestep))."
        )
    if not isinstance(level, NoiseLevel):
        raise TypeError(
            f"`noise_level` must be a guidance.spaces.NoiseLevel (e.g. NoiseLevel.ddpm(alpha_cumprod)), got {level!r}."
        )
    check_same_shape(pred, sample, name, "sample")
    if prediction_type == "flow_prediction" and not level.is_flow:
        raise ValueError(
            "`prediction_type='flow_prediction'` needs a flow-matching level (NoiseLevel.flow_matching)."
        )
    if prediction_type == "v_prediction" and level.is_flow:
        raise ValueError(
            "`prediction_type='v_prediction'` is the variance-preserving velocity; flow-matching models "
            "predict 'flow_prediction'."
        )
    alpha, sigma = _coefficients(level, pred)
    return prediction_type, work_dtype(pred), alpha, sigma


def _to_x0_coefficients(prediction_type: str, alpha: Level, sigma: Level) -> tuple[Level, Level]:
    """``(a, b)`` with ``x0 = a * x_t + b * pred``; ``ValueError`` where that is singular."""
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "epsilon":
        if _any_zero(alpha):
            raise ValueError(
                "Cannot convert an eps prediction to x0 at alpha = 0 (pure noise, alpha_cumprod = 0)."
            )
        return 1 / alpha, -sigma / alpha  # (x - sigma eps) / alpha
    if prediction_type == "v_prediction":
        r2 = alpha * alpha + sigma * sigma
        return alpha / r2, -sigma / _sqrt(r2)  # (alpha x - sigma r v) / r^2
    return 1.0, -sigma  # x - sigma v_flow


def _from_x0_coefficients(prediction_type: str, alpha: Level, sigma: Level) -> tuple[Level, Level]:
    """``(a, b)`` with ``pred = a * x_t + b * x0``; ``ValueError`` where that is singular."""
    if prediction_type == "sample":
        return 0.0, 1.0
    if _any_zero(sigma):
        raise ValueError(f"Cannot convert x0 to a {prediction_type!r} prediction at sigma = 0 (no noise left).")
    if prediction_type == "epsilon":
        return 1 / sigma, -alpha / sigma  # (x - alpha x0) / sigma
    if prediction_type == "v_prediction":
        r = _sqrt(alpha * alpha + sigma * sigma)
        return alpha / (sigma * r), -r / sigma  # (alpha x - r^2 x0) / (sigma r)
    return 1 / sigma, -1 / sigma  # (x - x0) / sigma


def to_x0(pred: Tensor, sample: Tensor, prediction_type: str, noise_level: NoiseLevel | None) -> Tensor:
    """The denoised estimate x0 from a model prediction of ``prediction_type`` at ``sample = x_t``.

    Args:
        pred (Tensor): the model's prediction, floating point, batch first.
        sample (Tensor): the denoiser's input ``x_t``, same shape.
        prediction_type (str): ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow_prediction"``
            (or an alias, see :func:`normalize_prediction_type`).
        noise_level (NoiseLevel): the level of ``sample`` (``TypeError`` for another type;
            per-sample tensors must have ``B`` or 1 values).

    Returns:
        Tensor: x0 in ``pred``'s dtype (``pred`` itself for ``"sample"``), computed in float32 at least
        as ``a * sample + b * pred`` with the coefficients ``a``, ``b`` computed first in float64:
        finite wherever both terms are. Values are not inspected (no device sync).

    Raises ``ValueError`` where the conversion is singular (eps at ``alpha = 0``: pure noise carries
    no x0 information; checked with a device sync for tensor levels).

    Example:
        >>> import torch
        >>> from guidance.spaces import NoiseLevel, to_x0
        >>> to_x0(torch.tensor([[1.0]]), torch.tensor([[1.0]]), "epsilon", NoiseLevel.karras(0.5))
        tensor([[0.5000]])
    """
    prediction_type, dtype, alpha, sigma = _prepare(pred, sample, prediction_type, noise_level)
    if prediction_type == "sample":
        return pred
    a, b = _to_x0_coefficients(prediction_type, alpha, sigma)
    return saturate(_mix(a, sample, b, pred, dtype).to(pred.dtype), pred, sample)


def from_x0(x0: Tensor, sample: Tensor, prediction_type: str, noise_level: NoiseLevel | None) -> Tensor:
    """The prediction of ``prediction_type`` whose x0 (at ``sample = x_t``) is ``x0``: inverse of :func:`to_x0`.

    Args:
        x0 (Tensor): the denoised estimate, floating point, batch first.
        sample (Tensor): the denoiser's input ``x_t``, same shape.
        prediction_type (str): the prediction type to return (see :func:`to_x0`).
        noise_level (NoiseLevel): the level of ``sample``.

    Returns:
        Tensor: the prediction in ``x0``'s dtype (``x0`` itself for ``"sample"``), computed like
        :func:`to_x0` (float64 coefficients, one linear combination).

    Raises ``ValueError`` at ``sigma = 0`` for eps, v and flow velocity (no noise left to predict).

    Example:
        >>> import torch
        >>> from guidance.spaces import NoiseLevel, from_x0
        >>> from_x0(torch.tensor([[0.5]]), torch.tensor([[1.0]]), "epsilon", NoiseLevel.karras(0.5))
        tensor([[1.]])
    """
    prediction_type, dtype, alpha, sigma = _prepare(x0, sample, prediction_type, noise_level, "x0")
    if prediction_type == "sample":
        return x0
    a, b = _from_x0_coefficients(prediction_type, alpha, sigma)
    return saturate(_mix(a, sample, b, x0, dtype).to(x0.dtype), x0, sample)


def convert(
    pred: Tensor, sample: Tensor, from_type: str, to_type: str, noise_level: NoiseLevel | None
) -> Tensor:
    """A prediction of ``from_type`` as one of ``to_type``; ``pred`` itself when the types match.

    The two steps through x0 are folded into one linear combination ``a * sample + b * pred`` whose
    coefficients are computed in float64, so an x0 that would overflow on the way does not matter.
    Singular where :func:`to_x0` or :func:`from_x0` is.

    Args:
        pred (Tensor): the prediction, floating point, batch first.
        sample (Tensor): the denoiser's input ``x_t``, same shape.
        from_type (str): ``pred``'s prediction type.
        to_type (str): the wanted prediction type.
        noise_level (NoiseLevel): the level of ``sample``.

    Example:
        >>> import torch
        >>> from guidance.spaces import NoiseLevel, convert
        >>> convert(torch.tensor([[1.0]]), torch.tensor([[1.0]]), "eps", "x0", NoiseLevel.karras(0.5))
        tensor([[0.5000]])
    """
    to_type = normalize_prediction_type(to_type)
    from_type, dtype, alpha, sigma = _prepare(pred, sample, from_type, noise_level)
    if from_type == to_type:
        return pred
    _prepare(pred, sample, to_type, noise_level)
    a1, b1 = _to_x0_coefficients(from_type, alpha, sigma)
    a2, b2 = _from_x0_coefficients(to_type, alpha, sigma)
    return saturate(_mix(a2 + b2 * a1, sample, b2 * b1, pred, dtype).to(pred.dtype), pred, sample)
