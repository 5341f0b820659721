"""Which samples still need the unconditional branch: adaptive guidance and a fixed-ratio cut-off.

Both policies answer, at each denoising step, "for which samples of the batch must the
unconditional prediction still be computed?" as a ``(B,)`` boolean mask, so an adapter can
evaluate the unconditional rows of those samples only and really save network evaluations.
A sample whose mask is ``False`` is sampled with its conditional prediction alone (guidance
off for that sample), which is what both methods prescribe.

* :class:`AdaptiveGuidance` (Castillo et al., "Adaptive Guidance: Training-free Acceleration of
  Conditional Diffusion Models", AAAI 2025): once the cosine similarity of ``c`` and ``u`` of a
  sample passes ``threshold``, that sample stops evaluating ``u`` for the rest of the run.
  Decisions are per sample: one slow sample does not keep the others paying for ``u``.
* :class:`RatioCutoff`: guidance for the steps ``0 .. int(num_steps * ratio)`` (inclusive), then
  conditional only, for every sample of the batch. This is the step rule of diffusers'
  ``SDCFGCutoffCallback`` (``cutoff_step_ratio`` / ``cutoff_step_index``), without its batch-1-only
  slicing of ``prompt_embeds[-1:]``.

Protocol used by :func:`guidance.diffusion.attach` (and usable by any sampling loop)::

    policy.reset()                                    # start of a run
    mask = policy.needs_uncond(step, num_steps, batch_size)   # (B,) bool
    ...evaluate u for the samples in mask...
    policy.update(step, cond[mask], uncond_rows, mask)        # after the step's predictions

Example:
    >>> import torch
    >>> from guidance.adaptive import AdaptiveGuidance
    >>> ag = AdaptiveGuidance(threshold=0.99)
    >>> ag.needs_uncond(0, 10, batch_size=2)
    tensor([True, True])
    >>> cond = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> uncond = torch.tensor([[1.0, 0.001], [0.0, 1.0]])  # sample 0 agrees, sample 1 does not
    >>> ag.update(0, cond, uncond)
    tensor([1.0000, 0.0000])
    >>> ag.needs_uncond(1, 10, batch_size=2)
    tensor([False,  True])
    >>> ag.passed_at
    [0, None]
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from guidance.tensors import pow2_scale, work_dtype
from guidance.validation import (
    check_dims,
    check_dims_setting,
    check_int,
    check_optional_int,
    check_range,
    check_same_shape,
    check_tensor,
)

__all__ = [
    "cosine_similarity",
    "UncondPolicy",
    "AdaptiveGuidance",
    "RatioCutoff",
]

Dims = int | tuple[int, ...] | None


def cosine_similarity(cond: Tensor, uncond: Tensor, dims: Dims = None) -> Tensor:
    """Per-sample cosine similarity ``<c, u> / (||c|| ||u||)`` over all non-batch dimensions (or ``dims``).

    Args:
        cond (Tensor): ``(B, ...)`` floating-point tensor with at least 2 dimensions.
        uncond (Tensor): same shape.
        dims (int | tuple[int, ...] | None): the reduction dimensions (never the batch dimension 0);
            ``None``: all non-batch dimensions. Dimensions left over are averaged.

    Returns:
        Tensor: ``(B,)`` similarities in ``[-1, 1]``, float32 (float64 for float64 inputs). Both vectors
        are power-of-two scaled first (exact), so the result does not depend on their magnitude
        (1e-30 and 1e20 work like 1). Zero norms never give NaN: two zero vectors are identical
        (similarity 1), a zero vector and a non-zero one are orthogonal (0). Values are not
        inspected: NaN inputs give NaN.

    Example:
        >>> import torch
        >>> from guidance.adaptive import cosine_similarity
        >>> cosine_similarity(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
        tensor([1., 1.])
    """
    check_tensor(cond, "cond", floating=True, min_ndim=2)
    check_tensor(uncond, "uncond", floating=True)
    check_same_shape(cond, uncond, "cond", "uncond")
    reduce = check_dims(dims, cond.ndim)
    dtype = work_dtype(cond)
    c, _ = pow2_scale(cond.to(dtype), reduce)
    u, _ = pow2_scale(uncond.to(dtype), reduce)
    dot = (c * u).sum(dim=reduce)
    norm_c = c.square().sum(dim=reduce).sqrt()
    norm_u = u.square().sum(dim=reduce).sqrt()
    denom = norm_c * norm_u
    both_zero = (norm_c == 0) & (norm_u == 0)
    cos = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(dot))
    cos = torch.where(both_zero, torch.ones_like(cos), cos).clamp(-1.0, 1.0)
    if cos.ndim > 1:  # `dims` left some non-batch dimensions: average their similarities
        cos = cos.flatten(1).mean(dim=1)
    return cos


def _check_step(step: int, num_steps: int | None) -> int:
    check_optional_int(num_steps, "num_steps", minimum=1)
    return check_int(step, "step", minimum=0)


@runtime_checkable
class UncondPolicy(Protocol):
    """Decides per step and per sample whether the unconditional prediction is still evaluated.

    Implemented by :class:`AdaptiveGuidance` and :class:`RatioCutoff`.

    Example:
        >>> from guidance.adaptive import RatioCutoff, UncondPolicy
        >>> isinstance(RatioCutoff(0.5), UncondPolicy)
        True
    """

    def reset(self) -> None:
        """Start of a sampling run."""

    def needs_uncond(self, step: int, num_steps: int | None, batch_size: int) -> Tensor:
        """``(B,)`` bool mask: ``step`` (int ``>= 0``), ``num_steps`` (int ``>= 1`` or ``None``), ``batch_size`` (int ``>= 1``)."""

    def update(self, step: int, cond: Tensor, uncond: Tensor, rows: Tensor | None = None) -> Tensor | None:
        """After a step: ``step`` (int ``>= 0``), ``cond``/``uncond`` of the evaluated samples, ``rows`` their mask."""


class AdaptiveGuidance:
    """Adaptive guidance (Castillo et al., AAAI 2025): drop ``u`` per sample once ``cos(c, u) > threshold``.

    ``threshold`` is in ``[-1, 1]``; the paper's and later implementations' values lie in
    ``0.99 .. 1.0`` (higher keeps guidance longer; ``1.0`` never stops it). The similarity is
    measured in the space the model predicts (eps, v or flow velocity), per sample over all
    non-batch dimensions (or ``dims``). ``min_steps`` guided steps always run first, for
    schedules whose first steps are not informative.

    State: ``passed_at[i]`` is the step at which sample ``i`` crossed the threshold (``None``
    while it still uses guidance), ``similarities`` the per-step ``(B,)`` similarities (NaN for
    samples that were not evaluated at that step). :meth:`reset` clears both; the batch size is
    fixed by the first :meth:`needs_uncond` call of a run.

    Example:
        >>> import torch
        >>> from guidance.adaptive import AdaptiveGuidance
        >>> ag = AdaptiveGuidance(0.999)
        >>> mask = ag.needs_uncond(0, 4, batch_size=1)
        >>> _ = ag.update(0, torch.ones(1, 3), torch.ones(1, 3))  # identical: passes
        >>> ag.needs_uncond(1, 4, batch_size=1)
        tensor([False])
    """

    def __init__(self, threshold: float = 0.99, *, min_steps: int = 0, dims: Dims = None):
        self.threshold = check_range(threshold, "threshold", -1.0, 1.0)
        self.min_steps = check_int(min_steps, "min_steps", minimum=0)
        self.dims = check_dims_setting(dims)
        self.reset()

    def reset(self) -> None:
        """Start of a sampling run: every sample uses guidance again."""
        self._passed: Tensor | None = None
        self.passed_at: list[int | None] = []
        self.similarities: list[Tensor] = []

    @property
    def passed(self) -> Tensor | None:
        """``(B,)`` bool: samples that no longer evaluate ``u`` (``None`` before the first step)."""
        return self._passed

    def _ensure_batch(self, batch_size: int) -> Tensor:
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        if self._passed is None:
            self._passed = torch.zeros(batch_size, dtype=torch.bool)
            self.passed_at = [None] * batch_size
        elif self._passed.numel() != batch_size:
            raise ValueError(
                f"The batch size changed from {self._passed.numel()} to {batch_size} within one run; "
                "call `reset()` between sampling runs."
            )
        return self._passed

    def needs_uncond(self, step: int, num_steps: int | None, batch_size: int) -> Tensor:
        """``(B,)`` bool mask (CPU) of the samples whose unconditional prediction is still needed at ``step``.

        Args:
            step (int): the step, an integer ``>= 0``.
            num_steps (int | None): total number of steps (unused; ``None`` or an integer ``>= 1``).
            batch_size (int): number of samples, an integer ``>= 1``, fixed within a run.
        """
        _check_step(step, num_steps)
        return ~self._ensure_batch(batch_size)

    def update(self, step: int, cond: Tensor, uncond: Tensor, rows: Tensor | None = None) -> Tensor:
        """Record ``cos(c, u)`` of the evaluated samples and retire those above the threshold.

        Args:
            step (int): the step just computed, an integer ``>= 0``.
            cond (Tensor): conditional predictions of the evaluated samples, ``(n, ...)``.
            uncond (Tensor): their unconditional predictions, same shape.
            rows (Tensor | None): ``(B,)`` bool mask of the evaluated samples (``None``: all).

        Returns:
            Tensor: the similarities of the evaluated samples. A NaN similarity never retires a sample.
        """
        _check_step(step, None)
        if rows is None:
            passed = self._ensure_batch(cond.shape[0])
            rows = torch.ones_like(passed)
        else:
            check_tensor(rows, "rows")
            if rows.dtype != torch.bool or rows.ndim != 1:
                raise ValueError(f"`rows` must be a (B,) bool mask, got {rows.dtype} of shape {tuple(rows.shape)}.")
            rows = rows.to(device="cpu")
            passed = self._ensure_batch(rows.numel())
            if int(rows.sum()) != cond.shape[0]:
                raise ValueError(
                    f"`rows` selects {int(rows.sum())} samples but `cond` has {cond.shape[0]} rows."
                )
        cos = cosine_similarity(cond, uncond, self.dims)
        full = torch.full((passed.numel(),), math.nan, dtype=cos.dtype)
        full[rows] = cos.detach().to("cpu")
        self.similarities.append(full)
        if step + 1 >= self.min_steps:
            crossed = torch.zeros_like(passed)
            crossed[rows] = cos.detach().to("cpu") > self.threshold
            newly = crossed & ~passed
            for i in newly.nonzero().flatten().tolist():
                self.passed_at[i] = step
            self._passed = passed | crossed
        return cos

    def __repr__(self) -> str:
        return f"AdaptiveGuidance(threshold={self.threshold}, min_steps={self.min_steps}, dims={self.dims})"


class RatioCutoff:
    """Guidance for steps ``0 .. cutoff`` (inclusive), conditional only afterwards, for all samples alike.

    ``cutoff = int(num_steps * ratio)`` or ``step`` (give one of them), the rule of diffusers'
    ``SDCFGCutoffCallback(cutoff_step_ratio=..., cutoff_step_index=...)``: its callback runs at
    the end of step ``cutoff`` and turns guidance off from step ``cutoff + 1`` on. Unlike that
    callback, this works for any batch size (see :class:`guidance.diffusion.CFGCutoffCallback`).
    Note the off-by-one difference to :class:`guidance.schedules.Cutoff`, which guides steps
    ``< int(num_steps * fraction)``.

    Example:
        >>> from guidance.adaptive import RatioCutoff
        >>> cut = RatioCutoff(0.4)
        >>> [bool(cut.needs_uncond(step, 5, batch_size=1)[0]) for step in range(5)]
        [True, True, True, False, False]
    """

    def __init__(self, ratio: float | None = None, *, step: int | None = None):
        if (ratio is None) == (step is None):
            raise ValueError("Give exactly one of `ratio` (in [0, 1]) and `step` (an integer >= 0).")
        self.ratio = None if ratio is None else check_range(ratio, "ratio", 0.0, 1.0)
        self.step = check_optional_int(step, "step", minimum=0)

    def cutoff_step(self, num_steps: int | None) -> int:
        """The last guided step (``num_steps``: ``None`` or an integer ``>= 1``; needed with ``ratio``)."""
        num_steps = check_optional_int(num_steps, "num_steps", minimum=1)
        if self.step is not None:
            return self.step
        if num_steps is None:
            raise ValueError("RatioCutoff(ratio=...) needs `num_steps`, the number of denoising steps.")
        return int(num_steps * self.ratio)

    def reset(self) -> None:
        """Nothing to reset: the rule depends on the step only."""

    def needs_uncond(self, step: int, num_steps: int | None, batch_size: int) -> Tensor:
        """``(B,)`` bool mask (CPU), the same for every sample: ``step <= cutoff_step(num_steps)``.

        Args:
            step (int): the step, an integer ``>= 0``.
            num_steps (int | None): total number of steps, an integer ``>= 1`` (needed with ``ratio``).
            batch_size (int): number of samples, an integer ``>= 1``.
        """
        step = _check_step(step, num_steps)
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        return torch.full((batch_size,), step <= self.cutoff_step(num_steps), dtype=torch.bool)

    def update(self, step: int, cond: Tensor, uncond: Tensor, rows: Tensor | None = None) -> None:
        """Nothing to record (the arguments ``step``, ``cond``, ``uncond``, ``rows`` are ignored)."""
        return None

    def __repr__(self) -> str:
        return f"RatioCutoff(ratio={self.ratio})" if self.step is None else f"RatioCutoff(step={self.step})"
