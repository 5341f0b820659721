"""Pure guidance operators: predictions in, prediction out.

Conventions (see ``docs/methods.md``):

* ``cond`` (c) is the conditional prediction, ``uncond`` (u) the unconditional or
  negative-prompt prediction, ``scale`` (w) the guidance scale.
* Scale convention: ``g = u + w * (c - u)``. ``w = 1`` is guidance off (returns ``c``
  bit for bit), ``w = 0`` gives ``u``. Ho & Salimans' ``w'`` is ``w - 1``; convert
  with :func:`scale_from_ho_salimans`.
* ``scale`` is a Python number or a tensor broadcastable against the batch
  dimension (shape ``(B,)`` gives one scale per sample).
* Operators work on any prediction type (eps, v, x0, logits) unless a docstring
  says otherwise; per-sample reductions run over all non-batch dimensions.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "cfg",
    "cfg_logits",
    "cfg_log_probs",
    "scale_from_ho_salimans",
    "scale_to_ho_salimans",
    "validate_scale",
    "rescale",
    "cfg_rescaled",
    "APG_CONVENTIONS",
    "MomentumBuffer",
    "apg",
    "zero_star_alpha",
    "cfg_zero_star",
    "perp_neg",
    "beta_cfg",
]

Scale = float | int | Tensor


def scale_from_ho_salimans(w_prime: float) -> float:
    """Ho & Salimans write ``(1 + w') c - w' u``; this returns our ``w = 1 + w'``."""
    return 1.0 + float(w_prime)


def scale_to_ho_salimans(scale: float) -> float:
    """Inverse of :func:`scale_from_ho_salimans`: ``w' = w - 1``."""
    return float(scale) - 1.0


def validate_scale(scale: Scale, name: str = "guidance_scale") -> None:
    """Raise ``ValueError`` naming ``name`` unless every scale is a finite real number."""
    if isinstance(scale, Tensor):
        if scale.is_complex() or not bool(torch.isfinite(scale).all()):
            raise ValueError(f"`{name}` must be finite real numbers in (-inf, inf), got {scale}.")
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"`{name}` must be a finite real number in (-inf, inf), got {scale!r}.")


def _is_one(scale: Scale) -> bool:
    return not isinstance(scale, Tensor) and scale == 1


def _is_zero(scale: Scale) -> bool:
    return not isinstance(scale, Tensor) and scale == 0


def _as_batch_scale(scale: Scale, like: Tensor) -> Scale:
    """A ``(B,)`` tensor scale becomes ``(B, 1, ..., 1)`` so it broadcasts per sample."""
    if not isinstance(scale, Tensor):
        return scale
    scale = scale.to(device=like.device, dtype=like.dtype)
    if scale.ndim == 1 and like.ndim > 1:
        scale = scale.reshape(-1, *([1] * (like.ndim - 1)))
    return scale


def _check_pair(cond: Tensor, uncond: Tensor) -> None:
    if cond.shape != uncond.shape:
        raise ValueError(
            f"`cond` and `uncond` must have the same shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}."
        )


def cfg(cond: Tensor, uncond: Tensor, scale: Scale) -> Tensor:
    """Classifier-free guidance ``u + w * (c - u)`` on any prediction type.

    Returns ``cond`` itself at ``scale == 1`` and ``uncond`` at ``scale == 0``. A tensor
    ``scale`` of shape ``(B,)`` guides each sample with its own scale; samples whose
    scale is exactly 1 are returned bit for bit.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg
        >>> c, u = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
        >>> cfg(c, u, 3.0)
        tensor([[ 4., -2.]])
    """
    _check_pair(cond, uncond)
    if _is_one(scale):
        return cond
    if _is_zero(scale):
        return uncond
    w = _as_batch_scale(scale, cond)
    guided = uncond + w * (cond - uncond)
    if isinstance(w, Tensor):
        guided = torch.where(w == 1, cond, guided)
    return guided


def _masked_combine(cond: Tensor, uncond: Tensor, scale: Scale) -> Tensor:
    """``u + w (c - u)`` where entries that are ``-inf`` in either branch stay ``-inf``.

    ``-inf`` marks a token that a processor or mask removed; combining two of them
    would compute ``inf - inf``. A token removed from either branch is removed from
    the guided distribution (only the branch with non-zero weight counts at w = 0/1,
    which the callers handle before getting here).
    """
    w = _as_batch_scale(scale, cond)
    cond_finite = torch.isfinite(cond)
    uncond_finite = torch.isfinite(uncond)
    both_finite = cond_finite & uncond_finite
    if bool(both_finite.all()):
        guided = w * (cond - uncond) + uncond
    else:
        c = torch.where(both_finite, cond, torch.zeros_like(cond))
        u = torch.where(both_finite, uncond, torch.zeros_like(uncond))
        guided = torch.where(both_finite, w * (c - u) + u, torch.full_like(cond, -math.inf))
    if isinstance(w, Tensor):
        guided = torch.where(w == 1, cond, torch.where(w == 0, uncond, guided))
    return guided


def cfg_logits(cond_logits: Tensor, uncond_logits: Tensor, scale: Scale) -> Tensor:
    """Raw-logit CFG: ``z_u + w * (z_c - z_u)`` (transformers' batched ``ClassifierFreeGuidanceLogitsProcessor``).

    Differs from :func:`cfg_log_probs` by a per-row constant, so it samples the same
    tokens under temperature/top-k/top-p/typical/min-p, but its scores (and beam
    scores, repetition penalty) differ. ``-inf`` entries (masked tokens) never
    produce NaN: a token masked in either guided branch stays masked.
    Returns ``cond_logits`` itself at ``scale == 1``.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_logits
        >>> cfg_logits(torch.tensor([[1.0, -float("inf")]]), torch.tensor([[0.0, 0.0]]), 2.0)
        tensor([[2., -inf]])
    """
    _check_pair(cond_logits, uncond_logits)
    if _is_one(scale):
        return cond_logits
    if _is_zero(scale):
        return uncond_logits
    return _masked_combine(cond_logits, uncond_logits, scale)


def cfg_log_probs(cond_logits: Tensor, uncond_logits: Tensor, scale: Scale) -> Tensor:
    """Log-prob CFG of Sanchez et al.: ``log_softmax(z_u) + w * (log_softmax(z_c) - log_softmax(z_u))``.

    This is the form of transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor``
    and gives the same numbers (same float operations in the same order). The
    normalisation runs in float32 at least; the result has the dtype of the inputs
    promoted to float32. At ``scale == 1`` guidance is off and ``cond_logits`` is
    returned unchanged (not normalised), so that decoding is bit-identical to plain
    decoding. ``-inf`` entries stay ``-inf``; rows never become NaN unless a whole
    branch row is ``-inf``.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_log_probs
        >>> out = cfg_log_probs(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), 1.5)
        >>> torch.round(out, decimals=4)
        tensor([[ 0.1562, -2.8438]])
    """
    _check_pair(cond_logits, uncond_logits)
    if _is_one(scale):
        return cond_logits
    dtype = torch.promote_types(cond_logits.dtype, torch.float32)
    cond_lp = torch.log_softmax(cond_logits.to(dtype), dim=-1)
    uncond_lp = torch.log_softmax(uncond_logits.to(dtype), dim=-1)
    if _is_zero(scale):
        return uncond_lp
    return _masked_combine(cond_lp, uncond_lp, scale)


# --------------------------------------------------------------------------------------------------
# Diffusion operators. Per-sample norms and dot products reduce over all non-batch dimensions
# unless `dims` names others; reductions run in float32 at least (the projection of APG in float64),
# and results come back in the dtype of `cond`.
# --------------------------------------------------------------------------------------------------

APG_CONVENTIONS = ("paper", "diffusers", "comfyui")


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _sample_dims(x: Tensor, dims: int | tuple[int, ...] | list[int] | None) -> list[int]:
    if dims is None:
        return list(range(1, x.ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims or any(not (-x.ndim <= d < x.ndim) for d in dims):
        raise ValueError(f"`dims` must be a non-empty list of dimensions of a {x.ndim}-d tensor, got {dims}.")
    return dims


def _check_range(value: float, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi):
        raise ValueError(f"`{name}` must be a number in [{lo}, {hi}], got {value!r}.")
    return float(value)


def _check_finite(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite real number in (-inf, inf), got {value!r}.")
    return float(value)


def _keep_cond_where_one(scale: Scale, cond: Tensor, guided: Tensor) -> Tensor:
    w = _as_batch_scale(scale, cond)
    return torch.where(w == 1, cond, guided) if isinstance(w, Tensor) else guided


def _vector_batch(fn):
    """Lets an operator take ``(B,)`` inputs (one scalar per sample) by viewing them as ``(B, 1)``."""

    @functools.wraps(fn)
    def wrapped(cond: Tensor, *args, **kwargs):
        if cond.ndim == 1 and kwargs.get("dims") is None:
            args = tuple(a.unsqueeze(-1) if isinstance(a, Tensor) and a.ndim == 1 else a for a in args)
            if isinstance(kwargs.get("negative"), Tensor):
                kwargs["negative"] = kwargs["negative"].unsqueeze(-1)
            return fn(cond.unsqueeze(-1), *args, **kwargs).squeeze(-1)
        return fn(cond, *args, **kwargs)

    return wrapped


def rescale(
    guided: Tensor, cond: Tensor, phi: float = 0.7, dims: int | tuple[int, ...] | None = None
) -> Tensor:
    """Guidance rescale (Lin et al. 2024): ``phi * guided * std(cond) / std(guided) + (1 - phi) * guided``.

    The same float operations in the same order as diffusers' ``rescale_noise_cfg`` (unbiased std over
    all non-batch dims), so float32 results are bit-identical to it. ``phi = 0`` returns ``guided``
    itself. A sample whose ``std(guided)`` is 0 (or undefined) is left unscaled instead of becoming NaN.

    Example:
        >>> import torch
        >>> from guidance.ops import rescale
        >>> g, c = torch.tensor([[4.0, -4.0]]), torch.tensor([[1.0, -1.0]])
        >>> rescale(g, c, phi=1.0)
        tensor([[ 1., -1.]])
    """
    phi = _check_range(phi, "phi", 0.0, 1.0)
    _check_pair(guided, cond)
    if phi == 0.0:
        return guided
    dims_ = _sample_dims(guided, dims)
    dtype = _work_dtype(guided)
    g, c = guided.to(dtype), cond.to(dtype)
    ratio = c.std(dim=dims_, keepdim=True) / g.std(dim=dims_, keepdim=True)
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    out = phi * (g * ratio) + (1 - phi) * g
    return out.to(guided.dtype)


def cfg_rescaled(
    cond: Tensor, uncond: Tensor, scale: Scale, phi: float = 0.7, dims: int | tuple[int, ...] | None = None
) -> Tensor:
    """CFG followed by :func:`rescale` towards ``std(cond)``: diffusers' ``guidance_rescale=phi``.

    Returns ``cond`` itself at ``scale == 1`` (diffusers' pipelines skip rescaling when they skip CFG).

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_rescaled
        >>> c, u = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 0.0]])
        >>> cfg_rescaled(c, u, 4.0, phi=0.5)
        tensor([[ 2.5000, -2.5000]])
    """
    _check_range(phi, "phi", 0.0, 1.0)
    if _is_one(scale):
        _check_pair(cond, uncond)
        return cond
    guided = rescale(cfg(cond, uncond, scale), cond, phi, dims)
    return _keep_cond_where_one(scale, cond, guided)


class MomentumBuffer:
    """APG's running average of the guidance direction: ``avg = d + momentum * avg_prev``.

    The first update returns ``d``. Call :meth:`reset` at the start of every sampling run (the
    guiders in :mod:`guidance.guiders` do). The paper uses negative momentum (e.g. ``-0.5``);
    ComfyUI's APG node takes ``[0, 1]``; diffusers accepts any value. Allowed here: ``[-1, 1]``.

    Example:
        >>> import torch
        >>> from guidance.ops import MomentumBuffer
        >>> buf = MomentumBuffer(-0.5)
        >>> buf.update(torch.tensor([2.0])), buf.update(torch.tensor([2.0]))
        (tensor([2.]), tensor([1.]))
    """

    def __init__(self, momentum: float):
        self.momentum = _check_range(momentum, "momentum", -1.0, 1.0)
        self.running_average: Tensor | None = None

    def update(self, direction: Tensor) -> Tensor:
        if self.running_average is None:
            self.running_average = direction
        else:
            if self.running_average.shape != direction.shape:
                raise ValueError(
                    f"MomentumBuffer holds a running average of shape {tuple(self.running_average.shape)} but got "
                    f"{tuple(direction.shape)}: call `reset()` at the start of each sampling run."
                )
            self.running_average = direction + self.momentum * self.running_average.to(direction.dtype)
        return self.running_average

    def reset(self) -> None:
        self.running_average = None

    def __repr__(self) -> str:
        shape = None if self.running_average is None else tuple(self.running_average.shape)
        return f"MomentumBuffer(momentum={self.momentum}, running_average_shape={shape})"


def _float64_device(x: Tensor) -> torch.device:
    return torch.device("cpu") if x.device.type in {"mps", "npu"} else x.device


@_vector_batch
def apg(
    cond: Tensor,
    uncond: Tensor,
    scale: Scale,
    *,
    eta: float = 0.0,
    momentum_buffer: MomentumBuffer | None = None,
    norm_threshold: float | None = None,
    convention: str = "paper",
    dims: int | tuple[int, ...] | None = None,
) -> Tensor:
    """Adaptive Projected Guidance (Sadat et al., ICLR 2025).

    ``d = c - u``, optionally ``d = momentum_buffer.update(d)`` and ``d *= min(1, r / ||d||)``
    (``r = norm_threshold``); then ``d`` is split into ``d_par``, its projection on ``c`` (in float64),
    and ``d_perp = d - d_par``, and with ``update = d_perp + eta * d_par`` the result is

    * ``convention="paper"`` (default): ``c + (w - 1) * update``. The paper applies it to denoised (x0)
      predictions and recommends ``eta = 0``; use :mod:`guidance.spaces` (or the ``APG`` guider,
      which does it for you) to get there from eps or v.
    * ``"diffusers"``: ``u + w * update``, diffusers' ``AdaptiveProjectedGuidance`` (which applies it
      to eps/v directly; its defaults are ``eta=1``, ``norm_threshold=15``). Equals the paper only at ``eta=1``.
    * ``"comfyui"``: ``c + w * update``, ComfyUI's APG node (on denoised predictions, momentum in
      ``[0, 1]``); also diffusers' ``use_original_formulation=True``.

    Returns ``cond`` itself at ``scale == 1`` and leaves the momentum buffer untouched then.
    ``norm_threshold`` ``None`` or ``0`` disables the threshold. Zero vectors give no NaN.

    Example:
        >>> import torch
        >>> from guidance.ops import apg
        >>> c, u = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])
        >>> apg(c, u, 3.0)  # d = (1, 0): only its part orthogonal to c is kept, eta = 0
        tensor([[2., 0.]])
    """
    if convention not in APG_CONVENTIONS:
        raise ValueError(f"`convention` must be one of {APG_CONVENTIONS}, got {convention!r}.")
    eta = _check_finite(eta, "eta")
    if norm_threshold is not None:
        norm_threshold = _check_range(norm_threshold, "norm_threshold", 0.0, math.inf)
        if math.isinf(norm_threshold):
            raise ValueError(f"`norm_threshold` must be finite (or None to disable), got {norm_threshold!r}.")
    if momentum_buffer is not None and convention == "comfyui":
        _check_range(momentum_buffer.momentum, "momentum", 0.0, 1.0)
    _check_pair(cond, uncond)
    if _is_one(scale):
        return cond
    dims_ = _sample_dims(cond, dims)
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)

    direction = c - u
    if momentum_buffer is not None:
        direction = momentum_buffer.update(direction)
    if norm_threshold:
        norm = direction.norm(p=2, dim=dims_, keepdim=True)
        direction = direction * torch.minimum(torch.ones_like(norm), norm_threshold / norm)

    device64 = _float64_device(direction)
    d64 = direction.to(device=device64, dtype=torch.float64)
    c_hat = torch.nn.functional.normalize(c.to(device=device64, dtype=torch.float64), dim=dims_)
    parallel = (d64 * c_hat).sum(dim=dims_, keepdim=True) * c_hat
    orthogonal = d64 - parallel
    parallel = parallel.to(device=direction.device, dtype=dtype)
    orthogonal = orthogonal.to(device=direction.device, dtype=dtype)
    update = orthogonal + eta * parallel

    w = _as_batch_scale(scale, c)
    if convention == "paper":
        guided = c + (w - 1) * update
    elif convention == "diffusers":
        guided = u + w * update
    else:
        guided = c + w * update
    return _keep_cond_where_one(scale, cond, guided.to(cond.dtype))


@_vector_batch
def zero_star_alpha(
    cond: Tensor, uncond: Tensor, eps: float = 1e-8, dims: int | tuple[int, ...] | None = None
) -> Tensor:
    """CFG-Zero*'s per-sample optimised scale ``<c, u> / (||u||^2 + eps)``, shaped ``(B, 1, ..., 1)``.

    Computed in float32 at least and returned in the dtype of ``cond``, as diffusers'
    ``cfg_zero_star_scale``. ``u = 0`` gives 0, not NaN.

    Example:
        >>> import torch
        >>> from guidance.ops import zero_star_alpha
        >>> zero_star_alpha(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
        tensor([[2.]])
    """
    _check_pair(cond, uncond)
    _check_range(eps, "eps", 0.0, math.inf)
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)
    if dims is None:
        c, u = c.flatten(1), u.flatten(1)
        dot = torch.sum(c * u, dim=1, keepdim=True)
        alpha = dot / (torch.sum(u**2, dim=1, keepdim=True) + eps)
        alpha = alpha.view(-1, *([1] * (cond.ndim - 1)))
    else:
        dims_ = _sample_dims(cond, dims)
        alpha = torch.sum(c * u, dim=dims_, keepdim=True) / (torch.sum(u**2, dim=dims_, keepdim=True) + eps)
    alpha = torch.where(torch.isfinite(alpha), alpha, torch.zeros_like(alpha))
    return alpha.to(cond.dtype)


def cfg_zero_star(
    cond: Tensor,
    uncond: Tensor,
    scale: Scale,
    *,
    eps: float = 1e-8,
    dims: int | tuple[int, ...] | None = None,
) -> Tensor:
    """CFG-Zero* (Fan et al. 2025): ``a u + w (c - a u)`` with ``a`` = :func:`zero_star_alpha`.

    The same operations as diffusers' ``ClassifierFreeZeroStarGuidance`` (bit-identical in float32).
    Zero-init (output 0 for the first steps) is a property of the sampling run, not of one
    combination: the :class:`~guidance.guiders.CFGZeroStar` guider does it. Returns ``cond`` at ``scale == 1``.

    Example:
        >>> import torch
        >>> from guidance.ops import cfg_zero_star
        >>> cfg_zero_star(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 0.0]]), 2.0)
        tensor([[2., 2.]])
    """
    _check_pair(cond, uncond)
    if _is_one(scale):
        return cond
    scaled_uncond = uncond * zero_star_alpha(cond, uncond, eps=eps, dims=dims)
    return cfg(cond, scaled_uncond, scale)


@_vector_batch
def perp_neg(
    cond: Tensor,
    uncond: Tensor,
    negative: Tensor,
    scale: Scale,
    neg_scale: float = 1.0,
    dims: int | tuple[int, ...] | None = None,
) -> Tensor:
    """Perp-Neg (Armandpour et al. 2023) with positive ``cond``, ``negative`` and empty-prompt ``uncond``.

    ``p = c - u``, ``n = negative - u``, ``n_perp = n - <n, p> / ||p||^2 p`` (per sample), and
    ``g = u + w (p - neg_scale * n_perp)``: only the part of the negative direction orthogonal to
    the positive one is subtracted. ComfyUI's ``perp_neg`` reduces over the whole batch; it agrees
    with this per-sample form for batch 1. ``scale == 1`` is guidance off and returns ``cond``
    (ComfyUI still subtracts ``n_perp`` there). ``p = 0`` gives ``n_perp = n``, not NaN.

    Example:
        >>> import torch
        >>> from guidance.ops import perp_neg
        >>> c, u, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
        >>> perp_neg(c, u, n, 2.0)
        tensor([[ 2., -2.]])
    """
    neg_scale = _check_range(neg_scale, "neg_scale", 0.0, math.inf)
    if math.isinf(neg_scale):
        raise ValueError(f"`neg_scale` must be finite, got {neg_scale!r}.")
    _check_pair(cond, uncond)
    _check_pair(cond, negative)
    if _is_one(scale):
        return cond
    dims_ = _sample_dims(cond, dims)
    dtype = _work_dtype(cond)
    c, u, n = cond.to(dtype), uncond.to(dtype), negative.to(dtype)
    pos, neg = c - u, n - u
    dot = (neg * pos).sum(dim=dims_, keepdim=True)
    squared_norm = (pos * pos).sum(dim=dims_, keepdim=True)
    coef = torch.where(squared_norm > 0, dot / squared_norm, torch.zeros_like(dot))
    perp = neg - coef * pos
    w = _as_batch_scale(scale, c)
    guided = u + w * (pos - neg_scale * perp)
    return _keep_cond_where_one(scale, cond, guided.to(cond.dtype))


@_vector_batch
def beta_cfg(
    cond: Tensor,
    uncond: Tensor,
    scale: Scale,
    gamma: float = 1.0,
    dims: int | tuple[int, ...] | None = None,
) -> Tensor:
    """beta-CFG's norm scaling (Malarz et al.): ``u + w (c - u) / ||c - u||^gamma`` (per-sample norm).

    The time weighting ``beta_pdf(t; a, b)`` is the schedule :class:`guidance.schedules.BetaPdf`; the
    :class:`~guidance.guiders.BetaCFG` guider pairs them as the authors' code does
    (``u + w * beta_pdf(t) * (c - u) / ||c - u||^gamma``). ``gamma = 0`` is plain CFG. ``scale == 1``
    is guidance off and returns ``cond``. ``c = u`` gives ``u``, not NaN.

    Example:
        >>> import torch
        >>> from guidance.ops import beta_cfg
        >>> beta_cfg(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]]), 2.0)
        tensor([[1.2000, 1.6000]])
    """
    gamma = _check_range(gamma, "gamma", 0.0, math.inf)
    if math.isinf(gamma):
        raise ValueError(f"`gamma` must be finite, got {gamma!r}.")
    _check_pair(cond, uncond)
    if _is_one(scale):
        return cond
    dims_ = _sample_dims(cond, dims)
    dtype = _work_dtype(cond)
    c, u = cond.to(dtype), uncond.to(dtype)
    diff = c - u
    norm = diff.norm(p=2, dim=dims_, keepdim=True)
    denominator = torch.where(norm > 0, norm**gamma, torch.ones_like(norm))
    w = _as_batch_scale(scale, c)
    guided = u + w * (diff / denominator)
    return _keep_cond_where_one(scale, cond, guided.to(cond.dtype))
