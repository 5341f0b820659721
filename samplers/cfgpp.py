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


def validate_cfgpp_scale(scale: float | Tensor, name: str = "scale") -> None:
    """CFG++'s ``lambda`` must lie in ``[0, 1]`` (0: unconditional sampling; 1: x0 from ``c``, re-noised with ``u``)."""
    if isinstance(scale, Tensor):
        ok = bool(torch.isfinite(scale).all()) and bool(((scale >= 0) & (scale <= 1)).all())
    else:
        ok = not isinstance(scale, bool) and isinstance(scale, (int, float)) and 0.0 <= scale <= 1.0
    if not ok:
        raise ValueError(f"`{name}` (CFG++'s lambda) must be in [0, 1], got {scale!r}.")


def _float(value: Level, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    return value


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion's ``(sigma_down, sigma_up)`` for an ancestral step from ``sigma_from`` to ``sigma_to``.

    ``eta = 0`` gives ``(sigma_to, 0)``: a deterministic step.
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


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

    ``denoised`` is ``x0_hat`` (the guided x0 estimate), ``uncond_denoised`` the unconditional
    one; the noise re-injected is the unconditional ``n_u = (x - alpha x0_u) / sigma``. ``eta > 0``
    adds fresh ``noise`` (required then) scaled by ``s_noise``. Computed in float32 at least and
    returned in ``x``'s dtype.
    """
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
    if eta < 0 or not math.isfinite(eta):
        raise ValueError(f"`eta` must be a finite number >= 0, got {eta!r}.")
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

    Example:
        >>> import torch
        >>> from samplers.cfgpp import ddim_cfgpp_step
        >>> x, c, u = torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 2)
        >>> ddim_cfgpp_step(x, c, u, 0.5, 1.0, scale=0.0)  # lambda 0 and a_prev 1: x0 from u alone
        tensor([[1.4142, 1.4142]])
    """
    validate_cfgpp_scale(scale)
    level, next_level = NoiseLevel.ddpm(float(alpha_cumprod)), NoiseLevel.ddpm(float(alpha_cumprod_prev))
    x0_c = to_x0(cond_eps, x, "epsilon", level)
    x0_u = to_x0(uncond_eps, x, "epsilon", level)
    return cfgpp_step(x, cfg(x0_c, x0_u, scale), x0_u, level, next_level, eta=eta, noise=noise)


def euler_cfgpp_step(
    x: Tensor,
    cond_denoised: Tensor,
    uncond_denoised: Tensor,
    sigma: float,
    sigma_next: float,
    scale: float | Tensor,
) -> Tensor:
    """Euler with CFG++ on k-diffusion's unscaled sample ``x = x0 + sigma n`` (ComfyUI's ``sample_euler_cfg_pp``).

    ``x_next = x0_hat + sigma_next (x - x0_u) / sigma``.
    """
    validate_cfgpp_scale(scale)
    return cfgpp_step(
        x,
        cfg(cond_denoised, uncond_denoised, scale),
        uncond_denoised,
        NoiseLevel.karras(float(sigma)),
        NoiseLevel.karras(float(sigma_next)),
    )


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
    """Ancestral Euler with CFG++ (ComfyUI's ``sample_euler_ancestral_cfg_pp`` for eps models): ``x0_hat + sigma_down n_u + sigma_up z``."""
    validate_cfgpp_scale(scale)
    return cfgpp_step(
        x,
        cfg(cond_denoised, uncond_denoised, scale),
        uncond_denoised,
        NoiseLevel.karras(float(sigma)),
        NoiseLevel.karras(float(sigma_next)),
        eta=eta,
        s_noise=s_noise,
        noise=noise,
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
    """CFG++ for rectified flow ``x = (1 - sigma) x0 + sigma n`` (ComfyUI's form for flow models):
    ``x_next = (1 - sigma_next) x0_hat + sigma_next n_u``."""
    validate_cfgpp_scale(scale)
    return cfgpp_step(
        x,
        cfg(cond_denoised, uncond_denoised, scale),
        uncond_denoised,
        NoiseLevel.flow_matching(float(sigma)),
        NoiseLevel.flow_matching(float(sigma_next)),
        eta=eta,
        noise=noise,
    )


DenoiserPair = Callable[..., tuple[Tensor, Tensor]]


def _progress(n: int, disable: bool | None):
    from tqdm.auto import trange

    return trange(n, disable=disable if disable is not None else n < 2, leave=False)


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
) -> Tensor:
    """k-diffusion-style ancestral Euler CFG++ loop over ``sigmas`` (decreasing, usually ending at 0).

    ``model(x, sigma, **extra_args)`` returns ``(cond_denoised, uncond_denoised)``. ``flow=True``
    treats ``x`` as a rectified-flow sample (``alpha = 1 - sigma``), otherwise ``x = x0 + sigma n``.
    ``noise_sampler(sigma, sigma_next)`` defaults to ``torch.randn_like(x)``.
    """
    validate_cfgpp_scale(scale)
    extra_args = {} if extra_args is None else extra_args
    sigmas = [float(s) for s in sigmas]
    make_level = NoiseLevel.flow_matching if flow else NoiseLevel.karras
    for i in _progress(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        cond_denoised, uncond_denoised = model(x, sigma, **extra_args)
        denoised = cfg(cond_denoised, uncond_denoised, scale)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        noise = None
        if eta > 0 and s_noise > 0 and sigma_next > 0:
            noise = noise_sampler(sigma, sigma_next) if noise_sampler is not None else torch.randn_like(x)
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

    ``alphas_cumprod[i]`` is the cumulative alpha of step ``i`` (the last entry is the target,
    e.g. ``1.0`` or ``alphas_cumprod[0]``). ``model(x, i, **extra_args)`` returns
    ``(cond_eps, uncond_eps)``.
    """
    validate_cfgpp_scale(scale)
    extra_args = {} if extra_args is None else extra_args
    alphas = [float(a) for a in alphas_cumprod]
    for i in _progress(len(alphas) - 1, disable):
        cond_eps, uncond_eps = model(x, i, **extra_args)
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_next = ddim_cfgpp_step(
            x, cond_eps, uncond_eps, alphas[i], alphas[i + 1], scale, eta=eta, noise=noise
        )
        if callback is not None:
            callback({"x": x, "i": i, "alpha_cumprod": alphas[i]})
        x = x_next
    return x
