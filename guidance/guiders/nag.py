"""Normalized Attention Guidance (NAG, Chen et al. 2025, arXiv 2505.21179) as a guider: negative prompts in one pass.

NAG guides inside the network: the conditional rows' cross-attention layers also attend to a
negative context and are pushed away from it (:func:`guidance.ops.normalized_attention_guidance`,
installed by :class:`~guidance.perturbations.NormalizedCrossAttention`). The guider therefore
needs no extra branch: it puts the hook on the ``cond`` branch itself, so NAG alone costs one
denoiser evaluation per image per step plus one cross-attention per layer. This is why it suits
few-step and distilled models, where CFG's second branch diverges or is not available.

It stacks with CFG: ``scale`` is the CFG scale (1, the default: no unconditional branch) and the
combine of the predictions is plain CFG, ``u + w (c_nag - u)``, with ``c_nag`` the NAG-guided
conditional prediction; the unconditional rows run without NAG.
"""

from __future__ import annotations

from typing import Any

from guidance.branches import COND, UNCOND, Branch
from guidance.guiders.base import Dims
from guidance.guiders.cfg import CFG
from guidance.ops.nag import check_nag_settings
from guidance.schedules import Schedule, as_schedule
from guidance.validation import check_finite, check_range

__all__ = ["NormalizedAttention"]


class NormalizedAttention(CFG):
    """NAG: the conditional prediction's cross-attention is guided away from a negative context; CFG on top.

    Args:
        scale (float | Schedule): CFG scale ``w`` (1, the default: NAG only, one evaluation per step).
        nag_scale (float | Schedule): NAG scale ``s`` (1: off). Default 5 (the paper's Flux-schnell
            setting; its SDXL-DMD2 example uses 3).
        negative (Tensor | Mapping | None): the negative context: text embeddings
            ``(1 or batch, tokens, features)`` or denoiser inputs with ``encoder_hidden_states``
            (``guidance.diffusion.prompt_inputs(pipe, "blurry")``). Required before the first guided step.
        tau (float): cap of the per-token norm ratio ``||z~|| / ||z+||``, ``> 0``. Default 2.5.
        alpha (float): blend weight of the normalised output in ``[0, 1]`` (0: off). Default 0.25.
        norm (str): per-token norm, ``"l1"`` (default; official UNet code, ComfyUI) or ``"l2"``
            (official Flux code).
        layers (str | Sequence[str] | Callable | None): which cross-attention layers (``None``: all).
        start (float), stop (float): NAG window as fractions of the run, ``start N <= step < stop N``
            (the official pipelines' ``nag_end`` is ``stop``). Default: every step.
        hook (Any): a replacement for the default :class:`~guidance.perturbations.NormalizedCrossAttention`
            (anything with ``per_row``, ``apply`` and a settable ``scale``).
        rescale (float), dims: guidance rescale of the CFG combine (see :class:`~guidance.guiders.CFG`).

    ``convention="comfyui"`` does not exist: ComfyUI's ``NAGuidance`` takes its negative from the
    unconditional rows and patches every attention output after the output projection, which this
    hook does not reproduce (see ``docs/methods/perturbation.md``); its defaults are
    ``nag_scale=5, alpha=0.5, tau=1.5``.

    Example:
        >>> import torch
        >>> from guidance.guiders import NormalizedAttention
        >>> guider = NormalizedAttention(nag_scale=4.0, negative=torch.zeros(1, 4, 8))
        >>> [(b.name, b.hook is not None) for b in guider.branches(step=0, num_steps=4)]
        [('cond', True)]
        >>> [b.name for b in NormalizedAttention(3.0, nag_scale=1.0).branches(step=0)]  # NAG off: plain CFG
        ['cond', 'uncond']
    """

    def __init__(
        self,
        scale: float | Schedule = 1.0,
        nag_scale: float | Schedule = 5.0,
        *,
        negative: Any = None,
        tau: float = 2.5,
        alpha: float = 0.25,
        norm: str = "l1",
        layers: Any = None,
        start: float = 0.0,
        stop: float = 1.0,
        hook: Any = None,
        rescale: float = 0.0,
        dims: Dims = None,
    ):
        super().__init__(scale, rescale=rescale, dims=dims)
        self.nag_schedule = as_schedule(nag_scale)
        _, self.tau, self.alpha, self.norm = check_nag_settings(1.0, tau, alpha, norm)
        self.start = check_range(start, "start", 0.0, 1.0)
        self.stop = check_range(stop, "stop", self.start, 1.0)
        if hook is not None and not callable(getattr(hook, "apply", None)):
            raise TypeError(f"`hook` must have `apply(module, rows)`, `per_row` and `scale`, got {hook!r}.")
        self.layers, self._hook = layers, hook
        self._negative = None
        if negative is not None:
            self.negative = negative

    @property
    def negative(self) -> Any:
        """The negative context (a tensor), or ``None`` while unset."""
        return self._negative

    @negative.setter
    def negative(self, value: Any) -> None:
        from guidance.perturbations.normalized_attention import negative_context

        self._negative = None if value is None else negative_context(value)
        if self._hook is not None and hasattr(self._hook, "negative"):
            self._hook.negative = self._negative

    @property
    def hook(self) -> Any:
        """The NAG hook installed on the ``cond`` branch."""
        if self._hook is None:
            from guidance.perturbations import NormalizedCrossAttention

            self._hook = NormalizedCrossAttention(
                self._negative, tau=self.tau, alpha=self.alpha, norm=self.norm, layers=self.layers
            )
        return self._hook

    def nag_scale_at(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        """``s`` at ``step``: 1 (off) outside the window or where ``alpha`` is 0."""
        inside = num_steps is None or self.start * num_steps <= step < self.stop * num_steps
        if not inside or self.alpha == 0.0:
            return 1.0
        return check_finite(self.nag_schedule(step, num_steps, sigma), f"nag_schedule({step})")

    def branches(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> tuple[Branch, ...]:
        s = self.nag_scale_at(step, num_steps, sigma)
        if s == 1.0:
            cond = COND
        else:
            if self._negative is None and self._hook is None:
                raise ValueError(
                    "NormalizedAttention needs the negative context: "
                    "`NormalizedAttention(..., negative=guidance.diffusion.prompt_inputs(pipe, 'blurry'))`."
                )
            hook = self.hook
            hook.scale = s
            cond = Branch("cond", hook=hook)
        return (cond, UNCOND) if self.needs_uncond(step, num_steps, sigma) else (cond,)

    def check_denoiser(self, module: Any) -> None:
        """Raise ``ValueError`` before a run when ``module`` cannot take NAG (called by ``attach``)."""
        from guidance.perturbations.normalized_attention import NormalizedCrossAttention, check_denoiser

        if self._hook is None or isinstance(self._hook, NormalizedCrossAttention):
            check_denoiser(module)
            if self._negative is None:
                raise ValueError(
                    "NormalizedAttention needs the negative context: "
                    "`NormalizedAttention(..., negative=guidance.diffusion.prompt_inputs(pipe, 'blurry'))`."
                )

    def _config(self) -> str:
        return (
            f"{super()._config()}, nag_scale={self.nag_schedule!r}, tau={self.tau}, alpha={self.alpha}, "
            f"norm={self.norm!r}, layers={self.layers!r}, window=({self.start}, {self.stop})"
        )
