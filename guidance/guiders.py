"""Guiders: small stateful classes over the pure operators of :mod:`guidance.ops`.

A guider combines the conditional and unconditional predictions of one denoising step, with its
scale taken from a schedule (:mod:`guidance.schedules`; a number becomes :class:`~guidance.schedules.Constant`).
Adapters (the diffusers denoiser wrapper, the modular-pipeline components in
:mod:`guidance.diffusion.modular`) drive it with this protocol:

* ``guider.reset()`` at the start of every sampling run (clears APG's momentum buffer; a guider
  also resets itself when ``step`` goes backwards).
* ``guider.needs_uncond(step, num_steps, sigma)``: ``False`` where the scale is exactly 1 (guidance
  off) or the output does not depend on ``uncond`` (CFG-Zero*'s zero-init steps). Skip the
  unconditional forward pass then and call the guider with ``uncond=None``.
* ``guider(cond, uncond, step=..., num_steps=..., sigma=..., **extra)``: the combined prediction.
  At scale 1 it returns ``cond`` itself (bit for bit). Perp-Neg takes ``negative=`` in ``extra``.
* ``guider.space``: ``"prediction"`` acts on whatever the model predicts (eps, v, x0, flow velocity);
  ``"x0"`` wants denoised predictions (APG's paper form). :func:`guide` converts with
  :mod:`guidance.spaces` and back, so adapters need not.

Conventions: scale ``w`` as in :mod:`guidance.ops` (``g = u + w (c - u)``, ``w = 1`` is off).

Example:
    >>> import torch
    >>> from guidance.guiders import APG, CFG, guide
    >>> from guidance.schedules import Linear
    >>> from guidance.spaces import NoiseLevel
    >>> cond, uncond = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    >>> guider = CFG(Linear(start=1.0, end=5.0))
    >>> guider.reset()
    >>> guider.needs_uncond(step=0, num_steps=3)  # scale 1 at the first step
    False
    >>> guider(cond, None, step=0, num_steps=3) is cond
    True
    >>> float(guider(cond, uncond, step=2, num_steps=3).mean())
    5.0
    >>> apg = APG(7.5, momentum=-0.5, norm_threshold=15.0)  # paper form: acts on x0
    >>> apg.space
    'x0'
    >>> sample = torch.randn(2, 4, 8, 8)
    >>> out = guide(apg, cond, uncond, step=0, num_steps=3, sample=sample,
    ...             prediction_type="epsilon", noise_level=NoiseLevel.ddpm(0.5))
    >>> out.shape
    torch.Size([2, 4, 8, 8])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidance import ops
from guidance.schedules import BetaPdf, Schedule, as_schedule
from guidance.spaces import NoiseLevel, from_x0, normalize_prediction_type, to_x0

__all__ = [
    "Guider",
    "CFG",
    "RescaledCFG",
    "APG",
    "CFGZeroStar",
    "PerpNeg",
    "BetaCFG",
    "guide",
    "GUIDER_SPACES",
]

GUIDER_SPACES = ("prediction", "x0")
Dims = int | tuple[int, ...] | None


class Guider:
    """Base class: a schedule, guidance-off handling, optional rescale, and the per-run state hooks.

    Subclasses implement :meth:`combine` (called only when the scale is not 1).
    """

    space: str = "prediction"
    needs_negative: bool = False

    def __init__(self, scale: float | Schedule = 7.5, *, rescale: float = 0.0, dims: Dims = None):
        self.schedule: Schedule = as_schedule(scale)
        self.rescale = ops._check_range(rescale, "rescale", 0.0, 1.0)
        self.dims = dims
        self._last_step: int | None = None

    def scale_at(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        """The guidance scale at ``step`` (``1.0``: guidance off)."""
        scale = float(self.schedule(step, num_steps, sigma))
        if not math.isfinite(scale):
            raise ValueError(f"The schedule returned a non-finite guidance scale {scale!r} at step {step}.")
        return scale

    def needs_uncond(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> bool:
        """Whether the unconditional prediction is needed at ``step``; ``False`` lets adapters skip it."""
        return self.scale_at(step, num_steps, sigma) != 1.0

    def reset(self) -> None:
        """Start of a sampling run."""
        self._last_step = None

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        raise NotImplementedError

    def _begin_step(self, step: int) -> None:
        if self._last_step is not None and step < self._last_step:
            self.reset()
        self._last_step = step

    def __call__(
        self,
        cond: Tensor,
        uncond: Tensor | None,
        *,
        step: int,
        num_steps: int | None = None,
        sigma: float | None = None,
        **extra: Tensor,
    ) -> Tensor:
        self._begin_step(step)
        scale = self.scale_at(step, num_steps, sigma)
        if scale == 1.0:
            return cond
        if uncond is None:
            raise ValueError(
                f"{type(self).__name__} needs the unconditional prediction at step {step} (scale {scale}); "
                "`uncond=None` is only allowed where `needs_uncond(...)` is False."
            )
        guided = self.combine(cond, uncond, scale, step=step, **extra)
        if self.rescale:
            guided = ops.rescale(guided, cond, self.rescale, self.dims)
        return guided

    def _config(self) -> str:
        return f"schedule={self.schedule!r}" + (f", rescale={self.rescale}" if self.rescale else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._config()})"


class CFG(Guider):
    """Classifier-free guidance ``u + w (c - u)``, with optional guidance rescale (``rescale=phi``).

    Same float operations as diffusers' pipelines and ``ClassifierFreeGuidance``.

    Example:
        >>> import torch
        >>> from guidance.guiders import CFG
        >>> CFG(3.0)(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]]), step=0)
        tensor([[ 4., -2.]])
    """

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.cfg(cond, uncond, scale)


class RescaledCFG(CFG):
    """CFG with guidance rescale (Lin et al. 2024), ``phi = rescale = 0.7`` by default: diffusers' ``guidance_rescale``.

    Example:
        >>> import torch
        >>> from guidance.guiders import RescaledCFG
        >>> RescaledCFG(4.0, rescale=0.5)(torch.tensor([[1.0, -1.0]]), torch.zeros(1, 2), step=0)
        tensor([[ 2.5000, -2.5000]])
    """

    def __init__(self, scale: float | Schedule = 7.5, rescale: float = 0.7, *, dims: Dims = None):
        super().__init__(scale, rescale=rescale, dims=dims)


class APG(Guider):
    """Adaptive Projected Guidance (Sadat et al., ICLR 2025); see :func:`guidance.ops.apg` for the math.

    ``convention="paper"`` (default) acts on denoised predictions (``space="x0"``) with
    ``c + (w - 1)(d_perp + eta d_par)``; ``"diffusers"`` reproduces diffusers'
    ``AdaptiveProjectedGuidance`` (on the raw prediction, ``u + w (...)``; pass ``eta=1.0,
    norm_threshold=15.0`` for its defaults); ``"comfyui"`` reproduces ComfyUI's APG node
    (``c + w (...)`` on denoised predictions, momentum in ``[0, 1]``). ``space`` overrides where it acts.
    ``momentum=beta`` keeps a running average of the guidance direction, reset by :meth:`reset`.

    Example:
        >>> import torch
        >>> from guidance.guiders import APG
        >>> apg = APG(3.0, convention="diffusers", eta=1.0)
        >>> apg(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]]), step=0)  # eta = 1: plain CFG
        tensor([[3., 1.]])
    """

    def __init__(
        self,
        scale: float | Schedule = 7.5,
        eta: float = 0.0,
        momentum: float | None = None,
        norm_threshold: float | None = None,
        convention: str = "paper",
        dims: Dims = None,
        *,
        space: str | None = None,
        rescale: float = 0.0,
    ):
        super().__init__(scale, rescale=rescale, dims=dims)
        if convention not in ops.APG_CONVENTIONS:
            raise ValueError(f"`convention` must be one of {ops.APG_CONVENTIONS}, got {convention!r}.")
        self.convention = convention
        self.eta = ops._check_finite(eta, "eta")
        if norm_threshold is not None:
            ops._check_range(norm_threshold, "norm_threshold", 0.0, math.inf)
            if math.isinf(norm_threshold):
                raise ValueError(
                    f"`norm_threshold` must be finite (or None to disable), got {norm_threshold!r}."
                )
        self.norm_threshold = norm_threshold
        if momentum is not None and convention == "comfyui":
            ops._check_range(momentum, "momentum", 0.0, 1.0)
        self.momentum = momentum
        self.momentum_buffer = None if momentum is None else ops.MomentumBuffer(momentum)
        if space is None:
            space = "prediction" if convention == "diffusers" else "x0"
        if space not in GUIDER_SPACES:
            raise ValueError(f"`space` must be one of {GUIDER_SPACES}, got {space!r}.")
        self.space = space

    def reset(self) -> None:
        super().reset()
        if self.momentum_buffer is not None:
            self.momentum_buffer.reset()

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.apg(
            cond,
            uncond,
            scale,
            eta=self.eta,
            momentum_buffer=self.momentum_buffer,
            norm_threshold=self.norm_threshold,
            convention=self.convention,
            dims=self.dims,
        )

    def _config(self) -> str:
        return (
            f"{super()._config()}, eta={self.eta}, momentum={self.momentum}, norm_threshold={self.norm_threshold}, "
            f"convention={self.convention!r}, space={self.space!r}"
        )


class CFGZeroStar(Guider):
    """CFG-Zero* (Fan et al. 2025): optimised unconditional scale, and zero output for the first steps.

    For ``step < zero_init_steps`` the output is ``zeros_like(cond)`` whatever the scale (as in
    diffusers' ``ClassifierFreeZeroStarGuidance``), and ``uncond`` is not needed there.
    ``use_zero_star=False`` keeps the zero-init but combines with plain CFG.

    Example:
        >>> import torch
        >>> from guidance.guiders import CFGZeroStar
        >>> g = CFGZeroStar(2.0, zero_init_steps=1)
        >>> c, u = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 0.0]])
        >>> g(c, None, step=0), g(c, u, step=1)
        (tensor([[0., 0.]]), tensor([[2., 2.]]))
    """

    def __init__(
        self,
        scale: float | Schedule = 7.5,
        zero_init_steps: int = 0,
        use_zero_star: bool = True,
        *,
        eps: float = 1e-8,
        rescale: float = 0.0,
        dims: Dims = None,
    ):
        super().__init__(scale, rescale=rescale, dims=dims)
        if isinstance(zero_init_steps, bool) or not isinstance(zero_init_steps, int) or zero_init_steps < 0:
            raise ValueError(f"`zero_init_steps` must be an integer >= 0, got {zero_init_steps!r}.")
        self.zero_init_steps = zero_init_steps
        self.use_zero_star = bool(use_zero_star)
        self.eps = ops._check_range(eps, "eps", 0.0, math.inf)

    def needs_uncond(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> bool:
        return step >= self.zero_init_steps and super().needs_uncond(step, num_steps, sigma)

    def __call__(
        self,
        cond: Tensor,
        uncond: Tensor | None,
        *,
        step: int,
        num_steps: int | None = None,
        sigma: float | None = None,
        **extra: Tensor,
    ) -> Tensor:
        if step < self.zero_init_steps:
            self._begin_step(step)
            return torch.zeros_like(cond)
        return super().__call__(cond, uncond, step=step, num_steps=num_steps, sigma=sigma, **extra)

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        if not self.use_zero_star:
            return ops.cfg(cond, uncond, scale)
        return ops.cfg_zero_star(cond, uncond, scale, eps=self.eps, dims=self.dims)

    def _config(self) -> str:
        return (
            f"{super()._config()}, zero_init_steps={self.zero_init_steps}, use_zero_star={self.use_zero_star}"
        )


class PerpNeg(Guider):
    """Perp-Neg (Armandpour et al. 2023): ``cond`` = positive prompt, ``uncond`` = empty prompt, ``negative=`` in extra.

    Needs three predictions per step (``needs_negative`` is True). See :func:`guidance.ops.perp_neg`.

    Example:
        >>> import torch
        >>> from guidance.guiders import PerpNeg
        >>> c, u, n = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])
        >>> PerpNeg(2.0)(c, u, negative=n, step=0)
        tensor([[ 2., -2.]])
    """

    needs_negative = True

    def __init__(
        self,
        scale: float | Schedule = 7.5,
        neg_scale: float = 1.0,
        *,
        rescale: float = 0.0,
        dims: Dims = None,
    ):
        super().__init__(scale, rescale=rescale, dims=dims)
        self.neg_scale = ops._check_range(neg_scale, "neg_scale", 0.0, math.inf)
        if math.isinf(self.neg_scale):
            raise ValueError(f"`neg_scale` must be finite, got {neg_scale!r}.")

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        negative = extra.get("negative")
        if negative is None:
            raise ValueError("PerpNeg needs the negative-prompt prediction: pass `negative=` to the guider.")
        return ops.perp_neg(cond, uncond, negative, scale, self.neg_scale, dims=self.dims)

    def _config(self) -> str:
        return f"{super()._config()}, neg_scale={self.neg_scale}"


class BetaCFG(Guider):
    """beta-CFG (Malarz et al.): ``u + w beta_pdf(t; a, b) (c - u) / ||c - u||^gamma``, ``t = step / (N - 1)``.

    A number ``scale`` becomes the schedule ``BetaPdf(scale, a, b)`` (so ``num_steps`` is needed);
    a schedule object is used as given (then ``a`` and ``b`` are unused). As in the authors' code,
    the weight is 0 at the first and last step for ``a, b > 1`` (the output is then ``uncond``).

    Example:
        >>> import torch
        >>> from guidance.guiders import BetaCFG
        >>> g = BetaCFG(7.5)
        >>> round(g.scale_at(1, 3), 4)  # 7.5 * beta_pdf(0.5; 2, 3)
        11.25
    """

    def __init__(
        self,
        scale: float | Schedule = 7.5,
        a: float = 2.0,
        b: float = 3.0,
        gamma: float = 1.0,
        *,
        rescale: float = 0.0,
        dims: Dims = None,
    ):
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            scale = BetaPdf(float(scale), a, b)
        super().__init__(scale, rescale=rescale, dims=dims)
        self.a, self.b = a, b
        self.gamma = ops._check_range(gamma, "gamma", 0.0, math.inf)
        if math.isinf(self.gamma):
            raise ValueError(f"`gamma` must be finite, got {gamma!r}.")

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.beta_cfg(cond, uncond, scale, self.gamma, dims=self.dims)

    def _config(self) -> str:
        return f"{super()._config()}, gamma={self.gamma}"


def guide(
    guider: Guider,
    cond: Tensor,
    uncond: Tensor | None,
    *,
    step: int,
    num_steps: int | None = None,
    sigma: float | None = None,
    sample: Tensor | None = None,
    prediction_type: str | None = None,
    noise_level: NoiseLevel | None = None,
    **extra: Tensor,
) -> Tensor:
    """Runs ``guider`` in its own space and returns a prediction of the model's ``prediction_type``.

    For ``guider.space == "x0"`` the predictions are converted to x0 with :func:`guidance.spaces.to_x0`
    (``sample`` is the denoiser's input ``x_t``, ``noise_level`` its noise level), guided, and
    converted back. Guidance off (scale 1, or the guider's own "no uncond" steps) skips the
    conversions, so the output is then exactly what the guider returns (``cond`` bit for bit at scale 1).

    Example:
        >>> import torch
        >>> from guidance.guiders import CFG, guide
        >>> c, u = torch.ones(1, 2), torch.zeros(1, 2)
        >>> guide(CFG(2.0), c, u, step=0)
        tensor([[2., 2.]])
    """
    kwargs = {"step": step, "num_steps": num_steps, "sigma": sigma, **extra}
    if guider.space == "prediction" or not guider.needs_uncond(step, num_steps, sigma):
        return guider(cond, uncond, **kwargs)
    if sample is None or prediction_type is None or noise_level is None:
        raise ValueError(
            f"{type(guider).__name__} acts on x0 (space='x0'): pass `sample`, `prediction_type` and `noise_level` "
            "(guidance.spaces.NoiseLevel) so the predictions can be converted."
        )
    prediction_type = normalize_prediction_type(prediction_type)
    if prediction_type == "sample":
        return guider(cond, uncond, **kwargs)

    def x0(pred: Tensor | None) -> Tensor | None:
        return None if pred is None else to_x0(pred, sample, prediction_type, noise_level)

    if "negative" in kwargs:
        kwargs["negative"] = x0(kwargs["negative"])
    guided_x0 = guider(x0(cond), x0(uncond), **kwargs)
    return from_x0(guided_x0, sample, prediction_type, noise_level)
