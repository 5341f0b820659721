"""The guider protocol (:class:`Guider`) and :func:`guide`, which runs a guider in its space.

Guiders: small stateful classes over the pure operators of :mod:`guidance.ops`.

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

from torch import Tensor

from guidance import ops
from guidance.schedules import Schedule, as_schedule
from guidance.spaces import NoiseLevel, from_x0, normalize_prediction_type, to_x0
from guidance.validation import check_dims_setting, check_finite, check_range

GUIDER_SPACES = ("prediction", "x0")
Dims = int | tuple[int, ...] | None


class Guider:
    """Base class: a schedule, guidance-off handling, optional rescale, and the per-run state hooks.

    Subclasses implement :meth:`combine` (called only when the scale is not 1). The constructor
    validates the settings (``ValueError``/``TypeError`` naming the argument); tensors are validated
    by the operator a subclass calls, and step/num_steps/sigma by the schedule.

    Args:
        scale (float | Schedule): the guidance scale ``w`` (a finite number, made a
            :class:`~guidance.schedules.Constant`) or a schedule (any callable
            ``(step, num_steps, sigma) -> float`` is wrapped in a ``FunctionSchedule``).
        rescale (float): guidance rescale ``phi`` in ``[0, 1]`` applied after the combine (0: off).
        dims (int | tuple[int, ...] | None): per-sample reduction dimensions for norm-based guiders
            and rescale; ``None``: all non-batch dimensions.

    Example:
        >>> import torch
        >>> from guidance.guiders import CFG
        >>> CFG(2.0, rescale=0.5)(torch.tensor([[1.0, -1.0]]), torch.zeros(1, 2), step=0)
        tensor([[ 1.5000, -1.5000]])
    """

    space: str = "prediction"
    needs_negative: bool = False

    def __init__(self, scale: float | Schedule = 7.5, *, rescale: float = 0.0, dims: Dims = None):
        self.schedule: Schedule = as_schedule(scale)
        self.rescale = check_range(rescale, "rescale", 0.0, 1.0)
        self.dims = check_dims_setting(dims)
        self._last_step: int | None = None

    def scale_at(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> float:
        """The guidance scale at ``step`` (``1.0``: guidance off); the schedule validates its arguments.

        Args:
            step (int): the step, an integer ``>= 0``.
            num_steps (int | None): total number of steps (``>= 1``) when known.
            sigma (float | None): the current noise level (``>= 0``) when known.
        """
        return check_finite(self.schedule(step, num_steps, sigma), f"schedule({step})")

    def needs_uncond(self, step: int, num_steps: int | None = None, sigma: float | None = None) -> bool:
        """Whether the unconditional prediction is needed at ``step``; ``False`` lets adapters skip it.

        Args:
            step (int): the step, an integer ``>= 0``.
            num_steps (int | None): total number of steps (``>= 1``) when known.
            sigma (float | None): the current noise level (``>= 0``) when known.
        """
        return self.scale_at(step, num_steps, sigma) != 1.0

    def reset(self) -> None:
        """Start of a sampling run."""
        self._last_step = None

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, *, step: int, **extra: Tensor) -> Tensor:
        """The guided prediction at a scale that is not 1 (subclasses implement it with their op).

        Args:
            cond (Tensor): the conditional prediction.
            uncond (Tensor): the unconditional prediction (validated by the op).
            scale (float): the scale at this step, finite and not 1.
            step (int): the step.
            **extra (Tensor): further predictions (Perp-Neg: ``negative``).
        """
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
        """The combined prediction at ``step``: ``cond`` itself where the scale is 1.

        Args:
            cond (Tensor): the conditional prediction (floating point, batch first).
            uncond (Tensor | None): the unconditional prediction, same shape; ``None`` only where
                :meth:`needs_uncond` is ``False``.
            step (int): the step, an integer ``>= 0``; a step lower than the previous one starts a new run.
            num_steps (int | None): total number of steps when known.
            sigma (float | None): the current noise level when known.
            **extra (Tensor): further predictions a guider needs (Perp-Neg: ``negative=``).
        """
        scale = self.scale_at(step, num_steps, sigma)
        self._begin_step(step)
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

    Args:
        guider (Guider): the guider to run.
        cond (Tensor): the conditional prediction of the model, floating point, batch first.
        uncond (Tensor | None): the unconditional prediction (``None`` where not needed).
        step (int): the step, an integer ``>= 0``.
        num_steps (int | None): total number of steps when known.
        sigma (float | None): the current noise level (for schedules) when known.
        sample (Tensor | None): the denoiser's input ``x_t`` (needed for ``space == "x0"``).
        prediction_type (str | None): what the model predicts (see :mod:`guidance.spaces`).
        noise_level (NoiseLevel | None): the noise level of ``sample``.
        **extra (Tensor): further predictions (Perp-Neg: ``negative=``), converted alike.

    Returns:
        Tensor: the guided prediction, of the model's prediction type.

    Example:
        >>> import torch
        >>> from guidance.guiders import CFG, guide
        >>> c, u = torch.ones(1, 2), torch.zeros(1, 2)
        >>> guide(CFG(2.0), c, u, step=0)
        tensor([[2., 2.]])
    """
    if not isinstance(guider, Guider):
        raise TypeError(f"`guider` must be a guidance.guiders.Guider, got {type(guider).__name__}.")
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

    for name, value in extra.items():  # every extra branch (negative, perturbed, weak...) is a prediction
        if isinstance(value, Tensor):
            kwargs[name] = x0(value)
    guided_x0 = guider(x0(cond), x0(uncond), **kwargs)
    return from_x0(guided_x0, sample, prediction_type, noise_level)
