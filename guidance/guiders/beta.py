"""Beta-CFG."""

from __future__ import annotations

from torch import Tensor

from guidance import ops
from guidance.guiders.base import Dims, Guider
from guidance.ops.beta import check_gamma
from guidance.schedules import BetaPdf, Schedule, check_beta_shape
from guidance.validation import is_real_number


class BetaCFG(Guider):
    """beta-CFG (Malarz et al.): ``u + w beta_pdf(t; a, b) (c - u) / ||c - u||^gamma``, ``t = step / (N - 1)``.

    A number ``scale`` becomes the schedule ``BetaPdf(scale, a, b)`` (so ``num_steps`` is needed);
    a schedule object is used as given (then ``a`` and ``b`` are unused, but still checked). As in
    the authors' code, the weight is 0 at the first and last step for ``a, b > 1`` (the output is
    then ``uncond``).

    Args:
        scale (float | Schedule): the peak-free scale ``w`` multiplying ``beta_pdf``, or a schedule.
        a (float): first beta shape parameter, in ``[1, 1e6]`` (see :func:`guidance.schedules.check_beta_shape`).
        b (float): second beta shape parameter, in ``[1, 1e6]``.
        gamma (float): norm exponent, a finite number ``>= 0`` (see :func:`guidance.ops.beta_cfg`).
        rescale (float): guidance rescale ``phi`` in ``[0, 1]`` (0: off).
        dims (int | tuple[int, ...] | None): per-sample reduction dimensions; ``None``: all non-batch ones.

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
        self.a, self.b = check_beta_shape(a, b)
        if is_real_number(scale) and not isinstance(scale, Tensor):
            scale = BetaPdf(scale, self.a, self.b)
        super().__init__(scale, rescale=rescale, dims=dims)
        self.gamma = check_gamma(gamma)

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        return ops.beta_cfg(cond, uncond, scale, self.gamma, dims=self.dims)

    def _config(self) -> str:
        return f"{super()._config()}, gamma={self.gamma}"
