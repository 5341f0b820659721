"""Guidance without an unconditional model: independent-condition (ICG) and time-step (TSG) guidance."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from guidance import ops
from guidance.guiders.base import Guider
from guidance.schedules import Schedule
from guidance.validation import check_int, check_range


class _ReferenceGuider(Guider):
    """CFG against a reference prediction that an adapter evaluates as an extra branch, not the pipeline's ``uncond``.

    ``branch`` names the keyword the reference arrives under (``guider(cond, None, step=..., **{branch: pred})``),
    ``perturbation`` is the object the adapter installs on the denoiser while evaluating it (see
    :mod:`guidance.diffusion.condition_hooks`). ``needs_uncond`` is always ``False``: the pipeline's
    unconditional rows are not used; :meth:`needs_reference` says when the branch must run.
    """

    branch: str = "reference"

    def needs_uncond(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> bool:
        return False

    def needs_reference(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> bool:
        """Whether the reference prediction is needed at ``step`` (guidance on)."""
        return self.scale_at(step, num_steps, sigma) != 1.0

    def perturbation(self) -> Any:
        """The denoiser hook that turns the conditional evaluation into the reference one."""
        raise NotImplementedError

    def branches(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> tuple[Any, ...]:
        """The branches to evaluate at ``step``: ``cond``, plus the reference branch while guidance is on."""
        from guidance.branches import COND, Branch  # the adapters' branch mechanism (imported on use)

        if not self.needs_reference(step, num_steps, sigma):
            return (COND,)
        return (COND, Branch(self.branch, source="cond", hook=self.perturbation()))

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
        reference = extra.pop(self.branch, None)
        if reference is None and self.needs_reference(step, num_steps, sigma):
            raise ValueError(
                f"{type(self).__name__} combines `cond` with the `{self.branch}=` prediction (the conditional "
                f"model under {self._what}), not with `uncond`; pass it, or run the guider through an adapter "
                "that evaluates its `branches()`."
            )
        return super().__call__(cond, reference, step=step, num_steps=num_steps, sigma=sigma, **extra)

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.cfg(cond, uncond, scale)


class IndependentCondition(_ReferenceGuider):
    """ICG (Sadat et al., ICLR 2025): CFG whose reference is the model under a random, sample-independent condition.

    ``g = D(y_rand) + w (D(y) - D(y_rand))``; ``y_rand`` is redrawn at every step: a uniform class
    label (``num_classes`` classes) for class-conditional models, Gaussian embeddings with the
    real ones' standard deviation for text-conditional ones. For models trained without
    condition dropout. Two network evaluations per step. The reference arrives as
    ``independent=`` (branch ``"independent"``); the adapter evaluates it with
    :meth:`perturbation` installed (:class:`guidance.diffusion.condition_hooks.RandomCondition`).

    Example:
        >>> import torch
        >>> from guidance.guiders import IndependentCondition
        >>> g = IndependentCondition(3.0, num_classes=10)
        >>> g.needs_uncond(step=0), g.needs_reference(step=0)
        (False, True)
        >>> g(torch.tensor([[2.0]]), None, step=0, independent=torch.tensor([[1.0]]))
        tensor([[4.]])
    """

    branch = "independent"
    _what = "a random condition"

    def __init__(
        self,
        scale: float | Schedule = 3.0,
        *,
        num_classes: int | None = None,
        match_std: bool = True,
        seed: int = 0,
        rescale: float = 0.0,
    ):
        super().__init__(scale, rescale=rescale)
        self.num_classes = None if num_classes is None else check_int(num_classes, "num_classes", minimum=1)
        self.match_std = bool(match_std)
        self.seed = check_int(seed, "seed")

    def perturbation(self) -> Any:
        from guidance.diffusion.condition_hooks import RandomCondition

        if not hasattr(self, "_hook"):
            self._hook = RandomCondition(num_classes=self.num_classes, match_std=self.match_std, seed=self.seed)
        return self._hook

    def reset(self) -> None:
        super().reset()
        if hasattr(self, "_hook"):
            self._hook.reset()

    def _config(self) -> str:
        return f"{super()._config()}, num_classes={self.num_classes}, match_std={self.match_std}, seed={self.seed}"


class TimestepGuidance(_ReferenceGuider):
    """TSG (Sadat et al., ICLR 2025): CFG whose reference is the model with a noisy time-step embedding.

    ``g = D(x, t~, y) + w (D(x, t, y) - D(x, t~, y))`` with ``t~_emb = t_emb + s (t / T)^a n std(t_emb)``
    (:func:`guidance.ops.perturb_time_embedding`), redrawn at every step. Reported SD setting
    (unconfirmed transcription): ``w = 4, s = 3, a = 0.25``, guidance only for ``t`` in ``[400, 1000]``
    (use an :class:`~guidance.schedules.Interval` schedule for that). Works for unconditional models
    too. Two network evaluations per step. The reference arrives as ``perturbed_time=``; the adapter
    evaluates it with :meth:`perturbation` installed
    (:class:`guidance.diffusion.condition_hooks.PerturbedTimestep`).

    Example:
        >>> import torch
        >>> from guidance.guiders import TimestepGuidance
        >>> g = TimestepGuidance(4.0)
        >>> g(torch.tensor([[2.0]]), None, step=0, perturbed_time=torch.tensor([[1.0]]))
        tensor([[5.]])
    """

    branch = "perturbed_time"
    _what = "a perturbed time-step embedding"

    def __init__(
        self,
        scale: float | Schedule = 4.0,
        *,
        noise_scale: float = 3.0,
        power: float = 0.25,
        time_scale: float = 1000.0,
        scale_by_std: bool = True,
        seed: int = 0,
        rescale: float = 0.0,
    ):
        super().__init__(scale, rescale=rescale)
        self.noise_scale = check_range(noise_scale, "noise_scale", 0.0, math.inf, hi_open=True)
        self.power = check_range(power, "power", 0.0, math.inf, hi_open=True)
        self.time_scale = check_range(time_scale, "time_scale", 0.0, math.inf, lo_open=True, hi_open=True)
        self.scale_by_std = bool(scale_by_std)
        self.seed = check_int(seed, "seed")

    def perturbation(self) -> Any:
        from guidance.diffusion.condition_hooks import PerturbedTimestep

        if not hasattr(self, "_hook"):
            self._hook = PerturbedTimestep(
                noise_scale=self.noise_scale,
                power=self.power,
                time_scale=self.time_scale,
                scale_by_std=self.scale_by_std,
                seed=self.seed,
            )
        return self._hook

    def reset(self) -> None:
        super().reset()
        if hasattr(self, "_hook"):
            self._hook.reset()

    def _config(self) -> str:
        return (
            f"{super()._config()}, noise_scale={self.noise_scale}, power={self.power}, "
            f"time_scale={self.time_scale}, scale_by_std={self.scale_by_std}, seed={self.seed}"
        )
