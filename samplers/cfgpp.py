"""CFG++ (Chung et al., "CFG++: Manifold-constrained Classifier Free Guidance", ICLR 2025).

CFG++ denoises with the guided prediction but re-noises with the unconditional one:
``x0_hat = x0_u + lambda (x0_c - x0_u)`` with ``lambda in [0, 1]``, then

    x_next = alpha_next * x0_hat + sigma_next * n_u,      n_u = (x - alpha * x0_u) / sigma

for a sample ``x = alpha * x0 + sigma * noise``. One formula covers the paper's DDIM form
(variance preserving: ``alpha = sqrt(alpha_cumprod)``, ``sigma = sqrt(1 - alpha_cumprod)``), the
Euler form of ComfyUI's ``sample_euler_cfg_pp`` (variance exploding: ``alpha = 1``, ``x_next =
x0_hat + sigma_next (x - x0_u) / sigma``) and rectified flow (``alpha = 1 - sigma``). With
``eta > 0`` the step is ancestral (DDIM's ``eta``, k-diffusion's ``get_ancestral_step``, taken on
the variance-exploding sigmas ``sigma / alpha``) as in ComfyUI's ``sample_euler_ancestral_cfg_pp``.

The functions are pure (k-diffusion style): tensors and noise levels in, next sample out. The
diffusers integration (a denoiser wrapper plus a ``scheduler.step`` replacement) is
``guidance.diffusion.attach(pipe, scale, mode="cfgpp")``.

Contract (every function): arguments are checked before any work, ``TypeError`` for a wrong
type and ``ValueError`` naming the argument and its range otherwise: ``lambda`` in [0, 1] (a
device tensor's values are read only by :func:`validate_cfgpp_scale` and the loops, never per
step, to avoid a device sync), noise levels finite and non-negative, ``eta`` and ``s_noise``
finite and >= 0, tensors floating point and of one shape. Finite inputs give finite outputs in
float32, float16 and bfloat16 (computed in float32 at least, returned in ``x``'s dtype); no
input is modified; the only randomness is the ``noise`` passed in (or drawn from the
``generator`` / ``noise_sampler`` of a loop). ``lambda = 1`` with ``sigma_next = 0`` returns
``cond`` bit for bit.

Example:
    >>> import torch
    >>> from samplers.cfgpp import euler_cfgpp_step
    >>> x = torch.tensor([[2.0, 0.0]])
    >>> cond, uncond = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])  # denoised predictions
    >>> euler_cfgpp_step(x, cond, uncond, sigma=2.0, sigma_next=1.0, scale=0.5)  # 0.5 + 1 * (2 - 0) / 2
    tensor([[1.5000, 0.0000]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from guidance.ops import cfg
from guidance.spaces import NoiseLevel, to_x0
from guidance.validation import (
    check_finite,
    check_range,
    check_same_shape,
    check_tensor,
    check_tensor_range,
)

__all__ = [
    "validate_cfgpp_scale",
    "get_ancestral_step",
    "cfgpp_step",
    "ddim_cfgpp_step",
    "euler_cfgpp_step",
    "euler_ancestral_cfgpp_step",
    "flow_euler_cfgpp_step",
    "sample_euler_cfgpp",
    "sample_euler_ancestral_cfgpp",
    "sample_ddim_cfgpp",
]

Level = float | Tensor


def _check_lambda(scale: float | Tensor, name: str, values: bool) -> float | Tensor:
    """CFG++'s ``lambda``: a real number (or real tensor) in [0, 1]; a device tensor's values only if ``values``."""
    if not isinstance(scale, Tensor):
        return check_range(scale, name, 0.0, 1.0)
    if values or scale.device.type == "cpu":
        return check_tensor_range(scale, name, 0.0, 1.0)
    return check_tensor(scale, name, real=True)


def validate_cfgpp_scale(scale: float | Tensor, name: str = "scale") -> None:
    """Check CFG++'s ``lambda``: a real number, or a real tensor, in ``[0, 1]``.

    ``0`` samples unconditionally; ``1`` takes x0 from ``cond`` and re-noises with ``uncond``.
    Raises ``TypeError`` for a non-real value and ``ValueError`` outside [0, 1] (NaN included).
    A tensor's values are read (one device sync on an accelerator): call this where the scale
    enters (``attach``, a loop), not per step; the step functions check device tensors' types only.

    Args:
        scale (`float` or `torch.Tensor`): the value to check.
        name (`str`, *optional*, defaults to ``"scale"``): the argument name for the message.

    Example:
        >>> from samplers.cfgpp import validate_cfgpp_scale
        >>> validate_cfgpp_scale(0.6)
        >>> validate_cfgpp_scale(1.5)
        Traceback (most recent call last):
        ...
        ValueError: `scale` must be a number in [0.0, 1.0], got 1.5.
    """
    _check_lambda(scale, name, values=True)


def _float(value: Level, name: str) -> float:
    return check_finite(value, name)


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion's ``(sigma_down, sigma_up)`` for an ancestral step from ``sigma_from`` down to ``sigma_to``.

    ``sigma_up = min(sigma_to, eta * sigma_to * sqrt(1 - sigma_to^2 / sigma_from^2))`` and
    ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``, so that ``sigma_down^2 + sigma_up^2 =
    sigma_to^2``. ``eta = 0`` gives ``(sigma_to, 0)``: a deterministic step; ``sigma_from = 0``
    (hence ``sigma_to = 0``) gives ``(0, 0)``.

    Args:
        sigma_from (`float`): current noise level, finite, >= 0.
        sigma_to (`float`): next noise level, finite, in [0, sigma_from] (an ancestral step
            never adds noise overall).
        eta (`float`, *optional*, defaults to 1.0): share of fresh noise, finite, >= 0 (values
            above 1 are allowed; ``sigma_up`` is capped at ``sigma_to``).

    Returns:
        `tuple[float, float]`: ``(sigma_down, sigma_up)``, both in [0, sigma_to].

    Example:
        >>> from samplers.cfgpp import get_ancestral_step
        >>> get_ancestral_step(2.0, 1.0)
        (0.5000000000000001, 0.8660254037844386)
        >>> get_ancestral_step(0.0, 0.0)
        (0.0, 0.0)
    """
    sigma_from = check_range(sigma_from, "sigma_from", 0.0, math.inf, hi_open=True)
    sigma_to = check_range(sigma_to, "sigma_to", 0.0, math.inf, hi_open=True)
    eta = check_range(eta, "eta", 0.0, math.inf, hi_open=True)
    if sigma_to > sigma_from:
        raise ValueError(
            f"`sigma_to` must be <= `sigma_from` (an ancestral step goes down in noise), got "
            f"sigma_from={sigma_from}, sigma_to={sigma_to}."
        )
    if eta == 0 or sigma_to == 0:
        return sigma_to, 0.0
    ratio = sigma_to / sigma_from  # in (0, 1]: no overflow in sigma^2 for large sigmas
    sigma_up = min(sigma_to, eta * sigma_to * math.sqrt(max(0.0, 1.0 - ratio * ratio)))
    up = sigma_up / sigma_to
    sigma_down = sigma_to * math.sqrt(max(0.0, 1.0 - up * up))
    return sigma_down, sigma_up


def _check_step_tensors(x: Tensor, *others: tuple[Tensor, str]) -> None:
    check_tensor(x, "x", floating=True)
    for tensor, name in others:
        check_tensor(tensor, name, floating=True)
        check_same_shape(x, tensor, "x", name)


def cfgpp_step(
    x: Tensor,
    denoised: Tensor,
    uncond_denoised: Tensor,
    level: NoiseLevel,
    next_level: NoiseLevel,
    *,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One CFG++ step from ``x = alpha x0 + sigma n`` (``level``) to ``next_level``, given the guided ``denoised``.

    ``x_next = alpha_next x0_hat + sigma_next n_u`` with the unconditional noise
    ``n_u = (x - alpha x0_u) / sigma``; ``sigma_next = 0`` returns ``alpha_next x0_hat``. With
    ``eta > 0`` the step is ancestral on the variance-exploding sigmas ``sigma / alpha``
    (:func:`get_ancestral_step`): ``alpha_next (x0_hat + sigma_down n_u + s_noise sigma_up z)``.
    Computed in float32 at least and returned in ``x``'s dtype; finite inputs give finite
    outputs.

    Args:
        x (`torch.Tensor`): the current sample, any shape, float dtype.
        denoised (`torch.Tensor`): the guided x0 estimate ``x0_hat``, ``x``'s shape.
        uncond_denoised (`torch.Tensor`): the unconditional x0 estimate ``x0_u``, ``x``'s shape.
        level (`NoiseLevel`): ``(alpha, sigma)`` of ``x``: finite, ``alpha >= 0``, ``sigma > 0``.
        next_level (`NoiseLevel`): ``(alpha, sigma)`` of the next sample: finite, both >= 0.
        eta (`float`, *optional*, defaults to 0.0): ancestral noise share, finite, >= 0; needs
            ``alpha > 0`` at both levels and ``sigma_next / alpha_next <= sigma / alpha``.
        s_noise (`float`, *optional*, defaults to 1.0): scale of the fresh noise, finite, >= 0.
        noise (`torch.Tensor`, *optional*): standard normal noise of ``x``'s shape; required
            when ``eta > 0``, ``s_noise > 0`` and ``sigma_next > 0``.

    Example:
        >>> import torch
        >>> from guidance.spaces import NoiseLevel
        >>> from samplers.cfgpp import cfgpp_step
        >>> x, x0_hat, x0_u = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.0])
        >>> cfgpp_step(x, x0_hat, x0_u, NoiseLevel.karras(3.0), NoiseLevel.karras(1.0))  # 1 + 1 * (3 - 0) / 3
        tensor([2.])
    """
    _check_step_tensors(x, (denoised, "denoised"), (uncond_denoised, "uncond_denoised"))
    alpha, sigma = _float(level.alpha, "alpha"), _float(level.sigma, "sigma")
    alpha_next, sigma_next = _float(next_level.alpha, "alpha_next"), _float(next_level.sigma, "sigma_next")
    if sigma <= 0 or alpha < 0:
        raise ValueError(
            f"CFG++ needs a noisy sample (alpha >= 0, sigma > 0), got alpha={alpha}, sigma={sigma}."
        )
    if sigma_next < 0 or alpha_next < 0:
        raise ValueError(
            f"`next_level` must have alpha >= 0 and sigma >= 0, got alpha={alpha_next}, sigma={sigma_next}."
        )
    eta = check_range(eta, "eta", 0.0, math.inf, hi_open=True)
    s_noise = check_range(s_noise, "s_noise", 0.0, math.inf, hi_open=True)
    if noise is not None:
        _check_step_tensors(x, (noise, "noise"))
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf, x0_hat, x0_u = x.to(dtype), denoised.to(dtype), uncond_denoised.to(dtype)
    if sigma_next == 0:
        return (alpha_next * x0_hat).to(x.dtype)
    noise_u = (xf - alpha * x0_u) / sigma
    if eta == 0:
        return (alpha_next * x0_hat + sigma_next * noise_u).to(x.dtype)
    if alpha == 0 or alpha_next == 0:
        raise ValueError("An ancestral CFG++ step (eta > 0) needs alpha > 0 at both noise levels.")
    sigma_down, sigma_up = get_ancestral_step(sigma / alpha, sigma_next / alpha_next, eta=eta)
    x_next = alpha_next * x0_hat + (alpha_next * sigma_down) * noise_u
    if sigma_up > 0 and s_noise > 0:
        if noise is None:
            raise ValueError(
                "An ancestral CFG++ step (eta > 0) needs `noise`, a standard normal tensor shaped like `x`."
            )
        x_next = x_next + alpha_next * noise.to(dtype) * s_noise * sigma_up
    return x_next.to(x.dtype)


def _guided_x0(
    x: Tensor, cond: Tensor, uncond: Tensor, scale: float | Tensor, names: tuple[str, str]
) -> Tensor:
    """Checks the step's tensors and ``lambda`` (a device tensor's type only: no sync), then ``cfg``."""
    _check_step_tensors(x, (cond, names[0]), (uncond, names[1]))
    return cfg(cond, uncond, _check_lambda(scale, "scale", values=False))


def ddim_cfgpp_step(
    x: Tensor,
    cond_eps: Tensor,
    uncond_eps: Tensor,
    alpha_cumprod: float,
    alpha_cumprod_prev: float,
    scale: float | Tensor,
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """DDIM with CFG++ on noise predictions (the paper's Algorithm 1; ``eta > 0`` is DDIM's stochastic form).

    ``eps_hat = u + lambda (c - u)``, ``x0_hat = (x - sqrt(1 - a) eps_hat) / sqrt(a)``,
    ``x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) u`` with ``a = alpha_cumprod`` at the current
    timestep and ``a_prev`` at the next one.

    Args:
        x (`torch.Tensor`): the variance-preserving sample at ``a``, any shape, float dtype.
        cond_eps (`torch.Tensor`): conditional noise prediction, ``x``'s shape.
        uncond_eps (`torch.Tensor`): unconditional noise prediction, ``x``'s shape.
        alpha_cumprod (`float`): ``a`` of the current step, in (0, 1).
        alpha_cumprod_prev (`float`): ``a_prev`` of the next (less noisy) step, in [0, 1].
        scale (`float` or `torch.Tensor`): CFG++'s ``lambda`` in [0, 1] (a number, or a tensor
            broadcastable per sample).
        eta (`float`, *optional*, defaults to 0.0): DDIM's eta, finite, >= 0.
        noise (`torch.Tensor`, *optional*): standard normal noise of ``x``'s shape, needed when
            ``eta > 0``.

    Example:
        >>> import torch
        >>> from samplers.cfgpp import ddim_cfgpp_step
        >>> x, c, u = torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 2)
        >>> ddim_cfgpp_step(x, c, u, 0.5, 1.0, scale=0.0)  # lambda 0 and a_prev 1: x0 from u alone
        tensor([[1.4142, 1.4142]])
    """
    _check_step_tensors(x, (cond_eps, "cond_eps"), (uncond_eps, "uncond_eps"))
    _check_lambda(scale, "scale", values=False)
    alpha_cumprod = check_range(alpha_cumprod, "alpha_cumprod", 0.0, 1.0, lo_open=True)
    alpha_cumprod_prev = check_range(alpha_cumprod_prev, "alpha_cumprod_prev", 0.0, 1.0)
    level, next_level = NoiseLevel.ddpm(alpha_cumprod), NoiseLevel.ddpm(alpha_cumprod_prev)
    x0_c = to_x0(cond_eps, x, "epsilon", level)
    x0_u = to_x0(uncond_eps, x, "epsilon", level)
    return cfgpp_step(x, cfg(x0_c, x0_u, scale), x0_u, level, next_level, eta=eta, noise=noise)


def _karras_levels(sigma: float, sigma_next: float) -> tuple[NoiseLevel, NoiseLevel]:
    sigma = check_range(sigma, "sigma", 0.0, math.inf, hi_open=True)
    sigma_next = check_range(sigma_next, "sigma_next", 0.0, math.inf, hi_open=True)
    return NoiseLevel.karras(sigma), NoiseLevel.karras(sigma_next)


def euler_cfgpp_step(
    x: Tensor,
    cond_denoised: Tensor,
    uncond_denoised: Tensor,
    sigma: float,
    sigma_next: float,
    scale: float | Tensor,
) -> Tensor:
    """Euler with CFG++ on k-diffusion's unscaled sample ``x = x0 + sigma n`` (ComfyUI's ``sample_euler_cfg_pp``).

    ``x_next = x0_hat + sigma_next (x - x0_u) / sigma`` with ``x0_hat = x0_u + lambda (x0_c - x0_u)``.

    Args:
        x (`torch.Tensor`): the current sample, any shape, float dtype.
        cond_denoised (`torch.Tensor`): conditional x0 prediction, ``x``'s shape.
        uncond_denoised (`torch.Tensor`): unconditional x0 prediction, ``x``'s shape.
        sigma (`float`): current noise level, finite, > 0.
        sigma_next (`float`): next noise level, finite, >= 0 (0: the step returns ``x0_hat``).
        scale (`float` or `torch.Tensor`): CFG++'s ``lambda`` in [0, 1].

    Example:
        >>> import torch
        >>> from samplers.cfgpp import euler_cfgpp_step
        >>> x = torch.tensor([[2.0, 0.0]])
        >>> cond, uncond = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
        >>> euler_cfgpp_step(x, cond, uncond, sigma=2.0, sigma_next=1.0, scale=0.5)
        tensor([[1.5000, 0.0000]])
    """
    x0_hat = _guided_x0(x, cond_denoised, uncond_denoised, scale, ("cond_denoised", "uncond_denoised"))
    return cfgpp_step(x, x0_hat, uncond_denoised, *_karras_levels(sigma, sigma_next))


def euler_ancestral_cfgpp_step(
    x: Tensor,
    cond_denoised: Tensor,
    uncond_denoised: Tensor,
    sigma: float,
    sigma_next: float,
    scale: float | Tensor,
    *,
    noise: Tensor | None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral Euler with CFG++ (ComfyUI's ``sample_euler_ancestral_cfg_pp`` for eps models).

    ``x_next = x0_hat + sigma_down n_u + s_noise sigma_up z`` with ``n_u = (x - x0_u) / sigma`` and
    ``(sigma_down, sigma_up) = get_ancestral_step(sigma, sigma_next, eta)``.

    Args:
        x (`torch.Tensor`): the current sample ``x0 + sigma n``, any shape, float dtype.
        cond_denoised (`torch.Tensor`): conditional x0 prediction, ``x``'s shape.
        uncond_denoised (`torch.Tensor`): unconditional x0 prediction, ``x``'s shape.
        sigma (`float`): current noise level, finite, > 0.
        sigma_next (`float`): next noise level, finite, in [0, sigma].
        scale (`float` or `torch.Tensor`): CFG++'s ``lambda`` in [0, 1].
        noise (`torch.Tensor` or None): standard normal ``z`` of ``x``'s shape (None only when no
            noise is added: ``eta = 0``, ``s_noise = 0`` or ``sigma_next = 0``).
        eta (`float`, *optional*, defaults to 1.0): ancestral noise share, finite, >= 0.
        s_noise (`float`, *optional*, defaults to 1.0): scale of ``z``, finite, >= 0.

    Example:
        >>> import torch
        >>> from samplers.cfgpp import euler_ancestral_cfgpp_step
        >>> x, c, u = torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]])
        >>> euler_ancestral_cfgpp_step(x, c, u, 2.0, 1.0, 0.5, noise=torch.zeros(1, 1))  # 0.5 + 0.5 * 1
        tensor([[1.]])
    """
    x0_hat = _guided_x0(x, cond_denoised, uncond_denoised, scale, ("cond_denoised", "uncond_denoised"))
    return cfgpp_step(
        x, x0_hat, uncond_denoised, *_karras_levels(sigma, sigma_next), eta=eta, s_noise=s_noise, noise=noise
    )


def flow_euler_cfgpp_step(
    x: Tensor,
    cond_denoised: Tensor,
    uncond_denoised: Tensor,
    sigma: float,
    sigma_next: float,
    scale: float | Tensor,
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """CFG++ for rectified flow ``x = (1 - sigma) x0 + sigma n`` (ComfyUI's form for flow models).

    ``x_next = (1 - sigma_next) x0_hat + sigma_next n_u`` with ``n_u = (x - (1 - sigma) x0_u) / sigma``.

    Args:
        x (`torch.Tensor`): the current sample, any shape, float dtype.
        cond_denoised (`torch.Tensor`): conditional x0 prediction, ``x``'s shape.
        uncond_denoised (`torch.Tensor`): unconditional x0 prediction, ``x``'s shape.
        sigma (`float`): current noise level, in (0, 1].
        sigma_next (`float`): next noise level, in [0, 1].
        scale (`float` or `torch.Tensor`): CFG++'s ``lambda`` in [0, 1].
        eta (`float`, *optional*, defaults to 0.0): ancestral noise share, finite, >= 0 (needs
            ``sigma < 1`` and ``sigma_next < 1``).
        noise (`torch.Tensor`, *optional*): standard normal noise of ``x``'s shape, needed when
            ``eta > 0``.

    Example:
        >>> import torch
        >>> from samplers.cfgpp import flow_euler_cfgpp_step
        >>> x, c, u = torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]])
        >>> flow_euler_cfgpp_step(x, c, u, 0.5, 0.25, 1.0)  # 0.75 * 1 + 0.25 * (1 - 0.5 * 0) / 0.5
        tensor([[1.2500]])
    """
    x0_hat = _guided_x0(x, cond_denoised, uncond_denoised, scale, ("cond_denoised", "uncond_denoised"))
    sigma = check_range(sigma, "sigma", 0.0, 1.0)
    sigma_next = check_range(sigma_next, "sigma_next", 0.0, 1.0)
    level, next_level = NoiseLevel.flow_matching(sigma), NoiseLevel.flow_matching(sigma_next)
    return cfgpp_step(x, x0_hat, uncond_denoised, level, next_level, eta=eta, noise=noise)


DenoiserPair = Callable[..., tuple[Tensor, Tensor]]


def _progress(n: int, disable: bool | None):
    from tqdm.auto import trange

    return trange(n, disable=disable if disable is not None else n < 2, leave=False)


def _check_loop(
    model: Any, x: Tensor, levels: Sequence[float] | Tensor, name: str, lo: float, hi: float
) -> list[float]:
    if not callable(model):
        raise TypeError(
            f"`model` must be callable, returning (cond, uncond) predictions; got {type(model).__name__}."
        )
    check_tensor(x, "x", floating=True)
    if isinstance(levels, Tensor):
        levels = levels.detach().cpu().flatten().tolist()
    values = [check_range(v, f"{name}[{i}]", lo, hi) for i, v in enumerate(levels)]
    if not values:
        raise ValueError(f"`{name}` must hold at least one noise level, got an empty sequence.")
    return values


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


@torch.no_grad()
def sample_euler_ancestral_cfgpp(
    model: DenoiserPair,
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    scale: float,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: Callable[[float, float], Tensor] | None = None,
    flow: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """k-diffusion-style ancestral Euler CFG++ loop over ``sigmas`` (decreasing, usually ending at 0).

    Each step: ``(c, u) = model(x, sigma, **extra_args)``, ``x0_hat = u + lambda (c - u)``, then
    :func:`cfgpp_step` with the unconditional noise re-injected (and fresh noise when
    ``eta > 0``).

    Args:
        model (`Callable`): ``model(x, sigma, **extra_args) -> (cond_denoised, uncond_denoised)``,
            x0 predictions of ``x``'s shape.
        x (`torch.Tensor`): the initial sample (``x0 + sigma_0 n``, or the flow sample), float.
        sigmas (`Sequence[float]` or `torch.Tensor`): noise levels, finite, >= 0 (in [0, 1]
            with ``flow``), non-increasing when ``eta > 0``.
        scale (`float`): CFG++'s ``lambda`` in [0, 1].
        extra_args (`dict`, *optional*): keyword arguments for ``model``.
        callback (`Callable`, *optional*): called each step with ``{"x", "i", "sigma",
            "sigma_hat", "denoised"}``.
        disable (`bool`, *optional*): disable the progress bar (default: on for 2+ steps).
        eta (`float`, *optional*, defaults to 1.0): ancestral noise share, finite, >= 0.
        s_noise (`float`, *optional*, defaults to 1.0): scale of the fresh noise, finite, >= 0.
        noise_sampler (`Callable`, *optional*): ``noise_sampler(sigma, sigma_next)`` returns
            standard normal noise of ``x``'s shape; defaults to draws from ``generator``.
        flow (`bool`, *optional*, defaults to `False`): ``x`` is a rectified-flow sample
            (``alpha = 1 - sigma``) instead of ``x0 + sigma n``.
        generator (`torch.Generator`, *optional*): source of the default noise (torch's global
            generator when None).

    Example:
        >>> import torch
        >>> from samplers.cfgpp import sample_euler_ancestral_cfgpp
        >>> model = lambda x, sigma: (torch.ones_like(x), torch.zeros_like(x))
        >>> out = sample_euler_ancestral_cfgpp(
        ...     model, torch.zeros(1, 2), [2.0, 1.0, 0.0], 0.5, generator=torch.Generator().manual_seed(0)
        ... )
        >>> out  # the last step returns x0_hat = 0 + 0.5 (1 - 0)
        tensor([[0.5000, 0.5000]])
    """
    validate_cfgpp_scale(scale)
    sigmas = _check_loop(model, x, sigmas, "sigmas", 0.0, 1.0 if flow else math.inf)
    eta = check_range(eta, "eta", 0.0, math.inf, hi_open=True)
    s_noise = check_range(s_noise, "s_noise", 0.0, math.inf, hi_open=True)
    extra_args = {} if extra_args is None else extra_args
    make_level = NoiseLevel.flow_matching if flow else NoiseLevel.karras
    for i in _progress(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        cond_denoised, uncond_denoised = model(x, sigma, **extra_args)
        denoised = cfg(cond_denoised, uncond_denoised, scale)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        noise = None
        if eta > 0 and s_noise > 0 and sigma_next > 0:
            noise = noise_sampler(sigma, sigma_next) if noise_sampler is not None else _noise(x, generator)
        x = cfgpp_step(
            x,
            denoised,
            uncond_denoised,
            make_level(sigma),
            make_level(sigma_next),
            eta=eta,
            s_noise=s_noise,
            noise=noise,
        )
    return x


def sample_euler_cfgpp(
    model: DenoiserPair,
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    scale: float,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    flow: bool = False,
) -> Tensor:
    """Deterministic Euler CFG++ loop (ComfyUI's ``sample_euler_cfg_pp``): the ancestral loop at ``eta = 0``.

    Args:
        model (`Callable`): ``model(x, sigma, **extra_args) -> (cond_denoised, uncond_denoised)``.
        x (`torch.Tensor`): the initial sample, float.
        sigmas (`Sequence[float]` or `torch.Tensor`): noise levels, finite, >= 0 (in [0, 1] with
            ``flow``), usually decreasing to 0.
        scale (`float`): CFG++'s ``lambda`` in [0, 1].
        extra_args (`dict`, *optional*): keyword arguments for ``model``.
        callback (`Callable`, *optional*): called each step (see the ancestral loop).
        disable (`bool`, *optional*): disable the progress bar.
        flow (`bool`, *optional*, defaults to `False`): rectified-flow sample.

    Example:
        >>> import torch
        >>> from samplers.cfgpp import sample_euler_cfgpp
        >>> target = torch.zeros(1, 3)
        >>> model = lambda x, sigma: (target + 1.0, target)  # cond and uncond denoised predictions
        >>> sample_euler_cfgpp(model, torch.randn(1, 3) * 10, [10.0, 1.0, 0.0], scale=0.5)
        tensor([[0.5000, 0.5000, 0.5000]])
    """
    return sample_euler_ancestral_cfgpp(
        model,
        x,
        sigmas,
        scale,
        extra_args=extra_args,
        callback=callback,
        disable=disable,
        eta=0.0,
        s_noise=0.0,
        flow=flow,
    )


@torch.no_grad()
def sample_ddim_cfgpp(
    model: DenoiserPair,
    x: Tensor,
    alphas_cumprod: Sequence[float] | Tensor,
    scale: float,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM CFG++ loop on a variance-preserving sample, ``alphas_cumprod`` increasing along sampling.

    Args:
        model (`Callable`): ``model(x, i, **extra_args) -> (cond_eps, uncond_eps)`` for step ``i``.
        x (`torch.Tensor`): the initial sample, float.
        alphas_cumprod (`Sequence[float]` or `torch.Tensor`): the cumulative alpha of each step,
            in [0, 1]; every step's entry but the last in (0, 1) (the last entry is the target,
            e.g. ``1.0`` or ``alphas_cumprod[0]``).
        scale (`float`): CFG++'s ``lambda`` in [0, 1].
        extra_args (`dict`, *optional*): keyword arguments for ``model``.
        callback (`Callable`, *optional*): called each step with ``{"x", "i", "alpha_cumprod"}``.
        disable (`bool`, *optional*): disable the progress bar.
        eta (`float`, *optional*, defaults to 0.0): DDIM's eta, finite, >= 0.
        generator (`torch.Generator`, *optional*): source of the noise when ``eta > 0``.

    Example:
        >>> import torch
        >>> from samplers.cfgpp import sample_ddim_cfgpp
        >>> model = lambda x, i: (torch.zeros_like(x), torch.zeros_like(x))  # predicts no noise
        >>> sample_ddim_cfgpp(model, torch.ones(1, 2), [0.25, 1.0], 0.5)  # x0 = x / sqrt(0.25)
        tensor([[2., 2.]])
    """
    validate_cfgpp_scale(scale)
    alphas = _check_loop(model, x, alphas_cumprod, "alphas_cumprod", 0.0, 1.0)
    check_range(eta, "eta", 0.0, math.inf, hi_open=True)
    extra_args = {} if extra_args is None else extra_args
    for i in _progress(len(alphas) - 1, disable):
        cond_eps, uncond_eps = model(x, i, **extra_args)
        noise = _noise(x, generator) if eta > 0 else None
        x_next = ddim_cfgpp_step(
            x, cond_eps, uncond_eps, alphas[i], alphas[i + 1], scale, eta=eta, noise=noise
        )
        if callback is not None:
            callback({"x": x, "i": i, "alpha_cumprod": alphas[i]})
        x = x_next
    return x
