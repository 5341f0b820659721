"""The dispatcher behind :mod:`samplers.kernels`: Triton on CUDA, the PyTorch reference elsewhere (see the package docstring for the contracts)."""

from __future__ import annotations

import functools
import math
import os
from types import ModuleType

import torch
from torch import Tensor

from guidance.tensors import surely_finite
from guidance.validation import check_batch_scale, check_range, check_same_shape, check_scale, check_tensor
from samplers.kernels import reference
from samplers.kernels.reference import (
    check_logit_values,
    check_logits,
    invalid_rows,
    row_uniforms,
    validate_filter_value,
    validate_mass,
    validate_min_tokens_to_keep,
    validate_temperature,
)

DISABLE_TRITON_ENV = "GUIDANCE_DISABLE_TRITON"
_FLOAT32_MAX = torch.finfo(torch.float32).max
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def _triton_module() -> ModuleType | None:
    try:
        from samplers.kernels import triton_kernels
    except ImportError:  # triton not installed (or a CPU-only build without its CUDA backend)
        return None
    return triton_kernels


def triton_available() -> bool:
    """Whether the Triton kernels can be imported (Triton installed).

    Example:
        >>> from samplers.kernels import triton_available
        >>> isinstance(triton_available(), bool)
        True
    """
    return _triton_module() is not None


def uses_triton(*tensors: Tensor) -> bool:
    """Whether a call on these tensors takes the Triton path (CUDA, float16/bfloat16/float32, 2-D).

    Args:
        *tensors (`torch.Tensor`): the logits a call would read.

    Example:
        >>> import torch
        >>> from samplers.kernels import uses_triton
        >>> uses_triton(torch.zeros(2, 8))  # a CPU tensor: the PyTorch path
        False
    """
    if os.environ.get(DISABLE_TRITON_ENV, "0") not in ("", "0"):
        return False
    if not all(t.is_cuda and t.dtype in _TRITON_DTYPES and t.ndim == 2 for t in tensors):
        return False
    return triton_available()


def _check_scale_for(scale: float | Tensor, batch: int, values: bool) -> float | Tensor:
    """Type and shape of a guidance scale; its values too when they are free or asked for."""
    if not isinstance(scale, Tensor):
        # the combine runs in float32: a larger number would round to inf there (and make 0 * inf)
        return check_range(scale, "scale", -_FLOAT32_MAX, _FLOAT32_MAX)
    check_batch_scale(scale, batch, "scale")
    if values or scale.device.type == "cpu":
        return check_scale(scale, "scale")
    return check_tensor(scale, "scale", real=True)


def _check_values(*named: tuple[Tensor, str]) -> bool:
    """:func:`check_logit_values` on each ``(tensor, name)``, after one cheap pass that clears the usual all-finite case.

    Returns whether that pass found every entry finite (False: some are ``-inf``, or a sum overflowed).
    """
    if surely_finite(*(tensor for tensor, _ in named)):
        return True
    for tensor, name in named:
        check_logit_values(tensor, name)
    return False


def cfg_log_softmax(
    cond_logits: Tensor, uncond_logits: Tensor, scale: float | Tensor, *, check_finite: bool = True
) -> Tensor:
    """Log-prob CFG ``log_softmax(u) + w (log_softmax(c) - log_softmax(u))``, fused on CUDA.

    The formula of :func:`guidance.ops.cfg_log_probs` (which the PyTorch path calls), with
    these edges defined on every path: a token that is ``-inf`` in either branch stays ``-inf``
    (at ``w = 0`` only ``uncond`` counts, at ``w = 1`` only ``cond``); a branch row that is
    entirely ``-inf`` gives an entirely ``-inf`` row where that branch counts (never NaN); a
    scale of exactly 1, a number or one row of a per-row tensor, returns ``cond_logits`` bit
    for bit (a number: the tensor itself, unchecked). The Triton kernel reads each input
    twice and writes the result once.

    Args:
        cond_logits (`torch.Tensor`): conditional logits, ``(batch, vocab)`` or ``(vocab,)``,
            any float dtype; finite or ``-inf``.
        uncond_logits (`torch.Tensor`): unconditional logits, the shape of ``cond_logits``.
        scale (`float` or `torch.Tensor`): guidance scale ``w``, a real number with
            ``|w| <= 3.4e38`` (float32's range; ``1``: off, ``0``: ``uncond``); or a real tensor of
            shape ``()``, ``(1,)`` or ``(batch,)`` (one scale per row, taken in float32). A CUDA
            tensor's values are checked only with ``check_finite``.
        check_finite (`bool`, *optional*, defaults to `True`): raise ``ValueError`` on NaN or
            ``+inf`` logits or scales (reads one flag per row back from the GPU); with
            ``False`` such rows come back all-NaN and nothing is read back.

    Returns:
        `torch.Tensor`: float32 guided log-probs (float64 for float64 inputs), ``cond_logits``'
        shape.

    Example:
        >>> import torch
        >>> from samplers.kernels import cfg_log_softmax
        >>> out = cfg_log_softmax(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), 1.5)
        >>> torch.round(out, decimals=4)
        tensor([[ 0.1562, -2.8438]])
    """
    check_logits(cond_logits, "cond_logits", allow_1d=True)
    check_tensor(uncond_logits, "uncond_logits", floating=True)
    check_same_shape(cond_logits, uncond_logits, "cond_logits", "uncond_logits")
    batch = cond_logits.shape[0] if cond_logits.ndim == 2 else 1
    scale = _check_scale_for(scale, batch, check_finite)
    if not isinstance(scale, Tensor) and scale == 1:
        return cond_logits
    if cond_logits.ndim == 1:
        return cfg_log_softmax(cond_logits[None], uncond_logits[None], scale, check_finite=check_finite)[0]
    if uses_triton(cond_logits, uncond_logits):
        return _triton_module().cfg_log_softmax_triton(
            cond_logits, uncond_logits, scale, check_finite=check_finite
        )
    finite: bool | None = None
    if check_finite:
        finite = _check_values((cond_logits, "cond_logits"), (uncond_logits, "uncond_logits"))
    out = reference.cfg_log_softmax_torch(cond_logits, uncond_logits, scale, finite=finite)
    if not check_finite:
        bad = invalid_rows(cond_logits) | invalid_rows(uncond_logits)
        if isinstance(scale, Tensor):
            bad = bad | ~torch.isfinite(reference._row_scale(scale, out)[:, 0])
        out = torch.where(bad[:, None], math.nan, out)
    return out


def typical_filter(
    scores: Tensor,
    mass: float,
    min_tokens_to_keep: int = 1,
    filter_value: float = -math.inf,
    *,
    check_finite: bool = True,
) -> Tensor:
    """Locally typical filter: scores of tokens outside the typical set become ``filter_value``.

    Keeps the smallest set of tokens, in ascending order of ``|-log p - H|``, whose mass
    reaches ``mass``: transformers' ``TypicalLogitsWarper`` semantics, without a sort and with
    the boundary decided by float64 sums (see :mod:`samplers.typical`). Tie rule: ties with
    the token that crosses the mass are all kept; when fewer than ``min_tokens_to_keep`` tokens
    are kept, exactly ``min_tokens_to_keep`` are, the first in (score, token id) order.

    Args:
        scores (`torch.Tensor`): logits, ``(batch, vocab)`` or ``(vocab,)``, any float dtype
            (selection in float32, output in the input dtype); finite or ``-inf``.
        mass (`float`): ``typical_p`` in (0, 1]; ``1`` returns ``scores`` itself (unchecked).
        min_tokens_to_keep (`int`, *optional*, defaults to 1): at least this many tokens are
            kept, >= 1 (all of them when it exceeds the vocabulary).
        filter_value (`float`, *optional*, defaults to ``-inf``): value of the removed tokens,
            any real number but NaN.
        check_finite (`bool`, *optional*, defaults to `True`): raise ``ValueError`` on NaN or
            ``+inf`` scores (on CUDA: reads one flag per row back after the kernel); with
            ``False`` such rows come back all-NaN and nothing is read back.

    Returns:
        `torch.Tensor`: ``scores``' shape and dtype. Rows that are entirely ``-inf`` are
        returned unchanged.

    Example:
        >>> import torch
        >>> from samplers.kernels import typical_filter
        >>> typical_filter(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), mass=0.5)
        tensor([[-0.6931, -1.2040,    -inf,    -inf]])
    """
    mass = validate_mass(mass)
    min_tokens_to_keep = validate_min_tokens_to_keep(min_tokens_to_keep)
    filter_value = validate_filter_value(filter_value)
    check_logits(scores, "scores", allow_1d=True)
    if mass >= 1.0:
        return scores
    rows = scores if scores.ndim == 2 else scores[None]
    if uses_triton(rows):
        out = _triton_module().typical_filter_triton(
            rows, mass, min_tokens_to_keep, filter_value, check_finite=check_finite
        )
    else:
        if check_finite:
            _check_values((rows, "scores"))
        out = reference.typical_filter_torch(
            rows, mass, min_tokens_to_keep, filter_value, mark_invalid=not check_finite
        )
    return out if scores.ndim == 2 else out[0]


def cfg_typical_sample(
    cond_logits: Tensor,
    uncond_logits: Tensor | None,
    scale: float | Tensor,
    mass: float,
    *,
    temperature: float = 1.0,
    min_tokens_to_keep: int = 1,
    seed: int | Tensor | None = None,
    generator: torch.Generator | None = None,
    check_finite: bool = True,
) -> Tensor:
    """Draw one token per row from the typical set of the CFG-guided, tempered distribution.

    Steps: ``l = cfg_log_softmax(cond, uncond, scale)`` (``cond`` itself at ``scale == 1`` or
    when ``uncond_logits`` is None), ``z = l / temperature``, the typical filter of ``z`` with
    ``mass`` and ``min_tokens_to_keep`` (the tie rule of :func:`typical_filter`), then an
    inverse-CDF draw over the kept tokens in vocabulary order with one uniform per row. On
    CUDA this is one fused pipeline that writes no vocabulary-sized intermediate.

    Seeds: the only randomness is one float64 uniform per row (:func:`reference.row_uniforms`).
    With ``seed`` the uniforms are a pure function of the seed (SplitMix64), identical on every
    device; the same seed and the same logits give the same tokens on the same device and
    kernel (the PyTorch and Triton paths agree except where float rounding decides a boundary
    token). In a decoding loop pass a ``generator`` (``batch`` float64 draws per call) or a new
    seed per step: a fixed ``seed`` gives the same uniform at every step. These draws never
    match ``torch.multinomial``'s for the same torch seed.

    Args:
        cond_logits (`torch.Tensor`): conditional logits ``(batch, vocab)``, float dtype,
            finite or ``-inf``.
        uncond_logits (`torch.Tensor` or None): unconditional logits of the same shape, or None
            (no guidance).
        scale (`float` or `torch.Tensor`): guidance scale, a real number with ``|w| <= 3.4e38``
            or a ``(batch,)`` real tensor (``1``: off).
        mass (`float`): ``typical_p`` in (0, 1]; ``1`` samples the full tempered distribution.
        temperature (`float`, *optional*, defaults to 1.0): in [1e-5, inf).
        min_tokens_to_keep (`int`, *optional*, defaults to 1): >= 1.
        seed (`int` or `torch.Tensor`, *optional*): an int in ``[0, 2**63 - batch)`` (row ``b``
            uses ``seed + b``) or a ``(batch,)`` integer tensor of per-row seeds.
        generator (`torch.Generator`, *optional*): source of the uniforms when ``seed`` is None
            (torch's global generator when both are None). Not both.
        check_finite (`bool`, *optional*, defaults to `True`): raise ``ValueError`` for rows
            with NaN / ``+inf`` logits or nothing to draw (reads one flag per row back from the
            GPU); with ``False`` those rows get token ``-1`` and nothing is read back.

    Returns:
        `torch.LongTensor`: ``(batch,)`` token ids.

    Example:
        >>> import torch
        >>> from samplers.kernels import cfg_typical_sample
        >>> cond = torch.tensor([[0.0, 4.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
        >>> cfg_typical_sample(cond, torch.zeros(2, 4), 2.0, 0.5, seed=0)
        tensor([1, 0])
    """
    mass = validate_mass(mass)
    temperature = validate_temperature(temperature)
    min_tokens_to_keep = validate_min_tokens_to_keep(min_tokens_to_keep)
    check_logits(cond_logits, "cond_logits")
    if uncond_logits is not None:
        check_tensor(uncond_logits, "uncond_logits", floating=True)
        check_same_shape(cond_logits, uncond_logits, "cond_logits", "uncond_logits")
    scale = _check_scale_for(scale, cond_logits.shape[0], check_finite)
    uniforms = row_uniforms(cond_logits.shape[0], cond_logits.device, seed=seed, generator=generator)
    guided = uncond_logits is not None and (isinstance(scale, Tensor) or scale != 1)
    tensors = (cond_logits, uncond_logits) if guided else (cond_logits,)
    args = (cond_logits, uncond_logits if guided else None, scale, mass)
    kwargs = {"temperature": temperature, "min_tokens_to_keep": min_tokens_to_keep, "uniforms": uniforms}
    if uses_triton(*tensors):
        return _triton_module().cfg_typical_sample_triton(*args, **kwargs, check_finite=check_finite)
    if check_finite:
        _check_values(*zip(tensors, ("cond_logits", "uncond_logits"), strict=False))
    tokens = reference.cfg_typical_sample_torch(*args, **kwargs)
    if check_finite:
        raise_for_missing_tokens(tokens)
    return tokens


def raise_for_missing_tokens(tokens: Tensor) -> None:
    """Raise ``ValueError`` naming the rows whose token is ``-1`` (nothing to draw). Reads ``tokens``.

    For loops that sample with ``check_finite=False`` and check at their own sync point.

    Args:
        tokens (`torch.Tensor`): ``(batch,)`` integer tokens from :func:`cfg_typical_sample`.

    Example:
        >>> import torch
        >>> from samplers.kernels import raise_for_missing_tokens
        >>> raise_for_missing_tokens(torch.tensor([3, -1]))
        Traceback (most recent call last):
        ...
        ValueError: Rows [1] of the guided logits have no token to sample: they are entirely -inf (or not finite after guidance and temperature).
    """
    missing = tokens < 0
    if bool(missing.any()):
        rows = missing.nonzero().flatten().tolist()
        raise ValueError(
            f"Rows {rows[:10]} of the guided logits have no token to sample: they are entirely -inf "
            "(or not finite after guidance and temperature)."
        )
