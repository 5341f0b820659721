"""Guiders that steer away from a perturbed forward pass: PAG, SEG, SLG/STG, TPG, S^2-Guidance.

Each declares a third branch, ``perturbed``: the conditional rows evaluated with a hook on the
denoiser (:mod:`guidance.perturbations`), and combines with
:func:`guidance.ops.perturbed_guidance`: ``g = u + w (c - u) + s (c - p)`` (``w = 1``: CFG off,
then ``g = c + s (c - p)``; ``s = 0``: perturbation off). Both off returns ``cond`` bit for bit.
The hooks act per row, so ``attach`` evaluates ``[uncond, cond, perturbed]`` in one call.

The perturbation window is a fraction of the run, ``start N <= step < stop N`` (default: every
step, as in the papers). ``convention="diffusers"`` reproduces diffusers' guiders: the window is
strict, ``int(start N) < step < int(stop N)``, and without CFG the output is ``p + s (c - p)``.

Guiders stay free of diffusers: the default hook is built on first use from the ``layers``
argument (or pass your own ``hook=``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from guidance import ops
from guidance.branches import COND, UNCOND, Branch
from guidance.guiders.base import Dims, Guider
from guidance.ops.perturbed import PERTURBED_CONVENTIONS
from guidance.schedules import Schedule, as_schedule
from guidance.validation import check_choice, check_finite, check_range

__all__ = [
    "PerturbedGuider",
    "PerturbedAttention",
    "SmoothedEnergy",
    "SkipLayer",
    "TokenPerturbation",
    "StochasticSelf",
]


class PerturbedGuider(Guider):
    """Base: CFG at ``scale`` plus ``perturbed_scale * (cond - perturbed)`` in a window of steps.

    Args:
        scale (float | Schedule): CFG scale ``w`` (1: no unconditional branch).
        perturbed_scale (float | Schedule): perturbation scale ``s`` (0: no perturbed branch).
        hook (Any): the perturbation (a :class:`~guidance.diffusion.branches.BranchHook`);
            ``None``: the subclass's default built from ``layers``.
        layers (str | Sequence[str] | Callable | None): where the default hook acts.
        start (float), stop (float): the perturbation window as fractions of the run, ``0 <= start <= stop <= 1``.
        convention (str): ``"paper"`` (default) or ``"diffusers"`` (module docstring).
        rescale (float): guidance rescale in [0, 1] toward ``cond``'s std (0: off).
        dims: per-sample reduction dims of the rescale.
    """

    def __init__(
        self,
        scale: float | Schedule = 1.0,
        perturbed_scale: float | Schedule = 3.0,
        *,
        hook: Any = None,
        layers: Any = None,
        start: float = 0.0,
        stop: float = 1.0,
        convention: str = "paper",
        rescale: float = 0.0,
        dims: Dims = None,
    ):
        super().__init__(scale, rescale=rescale, dims=dims)
        self.perturbed_schedule = as_schedule(perturbed_scale)
        self.start = check_range(start, "start", 0.0, 1.0)
        self.stop = check_range(stop, "stop", self.start, 1.0)
        self.convention = check_choice(convention, "convention", PERTURBED_CONVENTIONS)
        if hook is not None and not callable(getattr(hook, "apply", None)):
            raise TypeError(f"`hook` must have `apply(module, rows)` and `per_row`, got {hook!r}.")
        self.layers = layers
        self._hook = hook

    @property
    def hook(self) -> Any:
        """The perturbation installed on the ``perturbed`` branch."""
        if self._hook is None:
            self._hook = self.default_hook()
        return self._hook

    def default_hook(self) -> Any:
        raise NotImplementedError

    def in_window(self, step: int, num_steps: int | None) -> bool:
        if num_steps is None:
            return True
        if self.convention == "diffusers":
            return int(self.start * num_steps) < step < int(self.stop * num_steps)
        return self.start * num_steps <= step < self.stop * num_steps

    def perturbed_scale_at(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        """``s`` at ``step`` (0 outside the window: no perturbed evaluation)."""
        if not self.in_window(step, num_steps):
            return 0.0
        return check_finite(self.perturbed_schedule(step, num_steps, sigma), f"perturbed_schedule({step})")

    def branches(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> tuple[Branch, ...]:
        own = (COND, UNCOND) if self.needs_uncond(step, num_steps, sigma) else (COND,)
        if self.perturbed_scale_at(step, num_steps, sigma) == 0.0:
            return own
        return own + (Branch("perturbed", hook=self.hook),)

    def reset(self) -> None:
        super().reset()
        if callable(getattr(self._hook, "reset", None)):
            self._hook.reset()

    def __call__(
        self,
        cond: Tensor,
        uncond: Tensor | None,
        *,
        step: int,
        num_steps: int | None = None,
        sigma: float | None = None,
        perturbed: Tensor | None = None,
        **extra: Tensor,
    ) -> Tensor:
        self._begin_step(step)
        scale = self.scale_at(step, num_steps, sigma)
        s = self.perturbed_scale_at(step, num_steps, sigma)
        uncond = uncond if scale != 1.0 else None
        perturbed = perturbed if s != 0.0 else None
        if scale != 1.0 and uncond is None:
            raise ValueError(f"{type(self).__name__} needs `uncond` at step {step} (scale {scale}).")
        if s != 0.0 and perturbed is None:
            raise ValueError(f"{type(self).__name__} needs `perturbed=` at step {step} (perturbed scale {s}).")
        if uncond is None and perturbed is None:
            return cond
        guided = ops.perturbed_guidance(cond, uncond, perturbed, scale, s, convention=self.convention)
        if self.rescale:
            guided = ops.rescale(guided, cond, self.rescale, self.dims)
        return guided

    def _config(self) -> str:
        return (
            f"{super()._config()}, perturbed_scale={self.perturbed_schedule!r}, hook={self._hook or self.layers!r}, "
            f"window=({self.start}, {self.stop}), convention={self.convention!r}"
        )


class PerturbedAttention(PerturbedGuider):
    """Perturbed-Attention Guidance (PAG, Ahn et al. 2024): the perturbed branch's self-attention map is the identity.

    Defaults as diffusers' PAG pipelines: ``perturbed_scale=3.0``, layers ``"mid"`` (SD/SDXL
    UNets; ``"transformer_blocks.1"`` for SD3), every step. ``adaptive_scale`` ``a > 0`` gives
    the pipelines' ``s_t = max(0, s - a (1000 - t))`` with ``t`` the timestep (pass ``timesteps``).

    Example:
        >>> import torch
        >>> from guidance.guiders import PerturbedAttention
        >>> guider = PerturbedAttention(scale=5.0, perturbed_scale=3.0, layers="mid")
        >>> [b.name for b in guider.branches(step=0, num_steps=10)]
        ['cond', 'uncond', 'perturbed']
        >>> c, u, p = torch.ones(1, 2), torch.zeros(1, 2), torch.full((1, 2), 0.5)
        >>> guider(c, u, perturbed=p, step=0, num_steps=10)
        tensor([[6.5000, 6.5000]])
    """

    def __init__(self, scale: float | Schedule = 1.0, perturbed_scale: float | Schedule = 3.0, *,
                 layers: Any = "mid", **kwargs: Any):
        super().__init__(scale, perturbed_scale, layers=layers, **kwargs)

    def default_hook(self) -> Any:
        from guidance.perturbations import IdentityAttention

        return IdentityAttention(self.layers)


class SmoothedEnergy(PerturbedGuider):
    """Smoothed Energy Guidance (SEG, Hong 2024): the perturbed branch's self-attention queries are blurred.

    Args (besides :class:`PerturbedGuider`'s):
        sigma (float): blur std in tokens, > 0; ``>= 9999`` (default) is the infinite blur
            (each query replaced by the mean query). Defaults: ``perturbed_scale=3.0``, layers ``"mid"``.

    Example:
        >>> from guidance.guiders import SmoothedEnergy
        >>> SmoothedEnergy(3.0, sigma=10.0).hook
        SmoothedQueries(layers='mid', sigma=10.0)
    """

    def __init__(self, scale: float | Schedule = 1.0, perturbed_scale: float | Schedule = 3.0, *,
                 layers: Any = "mid", sigma: float = 9999.0, **kwargs: Any):
        super().__init__(scale, perturbed_scale, layers=layers, **kwargs)
        self.sigma = check_range(sigma, "sigma", 0.0, math.inf, lo_open=True)

    def default_hook(self) -> Any:
        from guidance.perturbations import SmoothedQueries

        return SmoothedQueries(self.layers, self.sigma)


class SkipLayer(PerturbedGuider):
    """Skip-Layer Guidance (SLG, SD3.5; STG-R): the perturbed branch skips whole blocks.

    ``layers`` is required (SD3.5 Medium: ``["transformer_blocks.7", "transformer_blocks.8",
    "transformer_blocks.9"]``). Defaults as diffusers' ``SkipLayerGuidance`` and the SD3.5
    reference: ``perturbed_scale=2.8``, window ``start=0.01, stop=0.2``.

    Example:
        >>> from guidance.guiders import SkipLayer
        >>> guider = SkipLayer(4.0, layers="transformer_blocks.7")
        >>> [len(guider.branches(step, num_steps=20)) for step in (0, 1, 3, 4)]
        [2, 3, 3, 2]
    """

    def __init__(self, scale: float | Schedule = 1.0, perturbed_scale: float | Schedule = 2.8, *,
                 layers: Any = None, start: float = 0.01, stop: float = 0.2, **kwargs: Any):
        if layers is None and kwargs.get("hook") is None:
            raise ValueError("SkipLayer needs `layers=` (e.g. 'transformer_blocks.7') or a `hook=`.")
        super().__init__(scale, perturbed_scale, layers=layers, start=start, stop=stop, **kwargs)

    def default_hook(self) -> Any:
        from guidance.perturbations import SkipBlocks

        return SkipBlocks(self.layers)


class TokenPerturbation(PerturbedGuider):
    """Token Perturbation Guidance (TPG, Rajabi et al. 2025): the perturbed branch's tokens are shuffled before chosen blocks.

    ``layers`` is required (e.g. ``"down_blocks.*.attentions.*.transformer_blocks.*"``); ``seed``
    seeds the permutations. Default ``perturbed_scale=3.0``, every step.

    Example:
        >>> from guidance.guiders import TokenPerturbation
        >>> TokenPerturbation(1.0, layers="transformer_blocks.0").hook.per_row
        True
    """

    def __init__(self, scale: float | Schedule = 1.0, perturbed_scale: float | Schedule = 3.0, *,
                 layers: Any = None, seed: int = 0, **kwargs: Any):
        if layers is None and kwargs.get("hook") is None:
            raise ValueError("TokenPerturbation needs `layers=` (the blocks whose input tokens are shuffled) or `hook=`.")
        super().__init__(scale, perturbed_scale, layers=layers, **kwargs)
        self.seed = seed

    def default_hook(self) -> Any:
        from guidance.perturbations import ShuffleTokens

        return ShuffleTokens(self.layers, self.seed)


class StochasticSelf(PerturbedGuider):
    """S^2-Guidance (Chen et al. 2025): steer away from a random sub-network (blocks dropped at random, redrawn every step).

    ``g = cfg + omega (c - c_sub)`` with ``omega = perturbed_scale`` (default 0.25) and a drop
    ``ratio`` (default 0.1) of the candidate ``layers``. The paper's exact combine is not
    public; this is the "steer away from the weaker prediction" form shared with PAG/SLG.

    Example:
        >>> from guidance.guiders import StochasticSelf
        >>> StochasticSelf(5.0, layers="transformer_blocks.*").hook
        StochasticSkip(layers='transformer_blocks.*', ratio=0.1, seed=0)
    """

    def __init__(self, scale: float | Schedule = 1.0, perturbed_scale: float | Schedule = 0.25, *,
                 layers: Any = None, ratio: float = 0.1, seed: int = 0, **kwargs: Any):
        if layers is None and kwargs.get("hook") is None:
            raise ValueError("StochasticSelf needs `layers=` (the candidate blocks) or `hook=`.")
        super().__init__(scale, perturbed_scale, layers=layers, **kwargs)
        self.ratio = check_range(ratio, "ratio", 0.0, 1.0, lo_open=True)
        self.seed = seed

    def default_hook(self) -> Any:
        from guidance.perturbations import StochasticSkip

        return StochasticSkip(self.layers, self.ratio, self.seed)
