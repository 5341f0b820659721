"""AutoGuidance: guide a model with a weaker version of itself."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from guidance import ops
from guidance.branches import COND, SOURCES, Branch
from guidance.guiders.base import Dims, Guider
from guidance.schedules import Schedule
from guidance.validation import check_choice


class AutoGuidance(Guider):
    """AutoGuidance (Karras et al. 2024): ``g = p_weak + w (c - p_weak)``, no unconditional branch.

    Args:
        scale (float | Schedule): ``w`` (1: off, only ``cond`` is evaluated).
        model (torch.nn.Module | None): the weaker network, called like the pipeline's denoiser
            (e.g. :func:`guidance.models.digits_weak.load_digits_weak_unet`).
        hook (Any): instead of (or on top of) ``model``, a perturbation making the pipeline's own
            network weaker (diffusers' ``AutoGuidance`` skips layers this way).
        source (str): ``"cond"`` (paper: the weak model sees the same condition) or ``"uncond"``
            (diffusers' ``AutoGuidance``, whose weak branch takes the unconditional inputs).
        rescale (float), dims: guidance rescale, as for :class:`~guidance.guiders.CFG`.

    Example:
        >>> import torch
        >>> from guidance.guiders import AutoGuidance
        >>> weak_net = torch.nn.Identity()
        >>> guider = AutoGuidance(2.0, model=weak_net)
        >>> [b.name for b in guider.branches(0)]
        ['cond', 'weak']
        >>> guider(torch.ones(1, 2), None, weak=torch.zeros(1, 2), step=0)
        tensor([[2., 2.]])
    """

    def __init__(self, scale: float | Schedule = 2.0, *, model: Any = None, hook: Any = None,
                 source: str = "cond", rescale: float = 0.0, dims: Dims = None):
        super().__init__(scale, rescale=rescale, dims=dims)
        if model is None and hook is None:
            raise ValueError("AutoGuidance needs the weaker network (`model=`) or a perturbation (`hook=`).")
        if model is not None and not callable(model):
            raise TypeError(f"`model` must be a callable network, got {type(model).__name__}.")
        if hook is not None and not callable(getattr(hook, "apply", None)):
            raise TypeError(f"`hook` must have `apply(module, rows)` and `per_row`, got {hook!r}.")
        self.model, self.hook = model, hook
        self.source = check_choice(source, "source", SOURCES)
        self._branch = Branch("weak", source=self.source, hook=hook, model=model)

    def needs_uncond(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> bool:
        return False

    def branches(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> tuple[Branch, ...]:
        return (COND,) if self.scale_at(step, num_steps, sigma) == 1.0 else (COND, self._branch)

    def __call__(self, cond: Tensor, uncond: Tensor | None, *, step: int, num_steps: int | None = None,
                 sigma: float | None = None, weak: Tensor | None = None, **extra: Tensor) -> Tensor:
        self._begin_step(step)
        scale = self.scale_at(step, num_steps, sigma)
        if scale == 1.0:
            return cond
        if weak is None:
            raise ValueError(f"AutoGuidance needs the weak prediction `weak=` at step {step} (scale {scale}).")
        guided = ops.autoguidance(cond, weak, scale)
        return ops.rescale(guided, cond, self.rescale, self.dims) if self.rescale else guided

    def _config(self) -> str:
        return f"{super()._config()}, model={type(self.model).__name__}, hook={self.hook!r}, source={self.source!r}"
