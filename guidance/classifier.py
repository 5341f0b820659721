"""Classifier-weighted logits: steer next-token scores with an attribute classifier.

Pure tensor functions (no transformers); the ``generate`` adapters live in
:mod:`guidance.lm.steering`. Conventions (see ``docs/methods.md``, "Classifier-weighted
logits"):

* **CAIF / FUDGE** (Sitdikov et al. 2022; Yang & Klein 2021). For each row take the
  ``top_k`` candidate tokens of the incoming scores, score ``prefix + token_i`` with a
  classifier of ``p(attribute | text)`` and add ``alpha * log p`` to each candidate's score.
  ``alpha > 0`` steers toward the attribute, ``alpha < 0`` away from it, ``alpha = 0`` is
  guidance off. Tokens outside the top k are **removed** (set to ``filter_value``, ``-inf``)
  by default, as in both papers, whose samplers draw from the reweighted top k only. Keeping
  them with unchanged scores would be biased: ``alpha * log p <= 0`` for every scored token
  when ``alpha > 0``, so the unscored tail would gain on the candidates it was never compared
  with. The alternative ``outside_top_k="prefix"`` keeps the tail and gives every unscored
  token the classifier's score of the prefix alone (``alpha * log p(attribute | prefix)``),
  the best estimate available without scoring it.
* **GeDi** (Krause et al. 2021; ParaGeDi, Dale et al. 2021). A class-conditional LM scored
  once per class ``c`` gives, for every vocabulary token ``v`` at once,
  ``log p(c | x_1..t, v) = log_softmax_c( s * (sum_j log P(x_j | x_<j, c) + log P(v | x, c)) / (t + 1) + b_c )``
  by Bayes' rule over the classes, length-normalised by the number of scored tokens
  (``s`` is GeDi's ``logit_scale``, ``b_c`` its per-class bias / log prior). The guided
  scores add ``omega * log p(desired | x, v)`` to the LM's scores; ``omega = 0`` is off.

Probabilities are clamped to the smallest normal float before the log, so a classifier that
answers exactly 0 gives a large finite penalty (or, with a negative weight, bonus), never
``inf`` or NaN. ``-inf`` (masked) scores stay ``-inf``.

Contract shared by the functions here: scores and log-probabilities are finite numbers or
``-inf``; NaN or ``+inf`` raises ``ValueError`` naming the argument (one device sync per call:
these functions run next to a classifier, which synchronises anyway). Weights (``alpha``,
``omega``) are finite numbers; wrong types raise ``TypeError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from guidance.validation import (
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_logits,
    check_no_nan,
    check_range,
    check_tensor,
    check_tensor_range,
)

__all__ = [
    "OUTSIDE_TOP_K",
    "TextClassifier",
    "as_probabilities",
    "attribute_log_probs",
    "classifier_weighted_logits",
    "entropy",
    "gedi_class_log_probs",
    "gedi_logits",
    "top_k_candidates",
    "validate_top_k",
]

#: Any callable from a list of texts to probabilities: shape ``(N,)`` (the attribute's
#: probability) or ``(N, C)`` (one column per class), as a tensor, array or nested list.
TextClassifier = Callable[[Sequence[str]], Any]

OUTSIDE_TOP_K = ("remove", "prefix")
OutsideTopK = Literal["remove", "prefix"]

# Probabilities are clamped here before the log: log(tiny) = -87.3 for float32.
_MIN_PROB = torch.finfo(torch.float32).tiny
# Probabilities a little outside [0, 1] are float round-off from a softmax/sigmoid.
_PROB_TOLERANCE = 1e-4


def validate_top_k(top_k: int, vocab_size: int | None = None, name: str = "top_k") -> None:
    """Raise unless ``1 <= top_k <= vocab_size``: ``TypeError`` for a non-integer, ``ValueError`` naming ``name``.

    Args:
        top_k (int): the number of candidates.
        vocab_size (int | None): the vocabulary size, if known.
        name (str): the argument's name for the error message.

    Example:
        >>> from guidance.classifier import validate_top_k
        >>> validate_top_k(5, vocab_size=3)
        Traceback (most recent call last):
        ...
        ValueError: `top_k` must be at most the vocabulary size 3, got 5.
    """
    top_k = check_int(top_k, name, minimum=1)
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"`{name}` must be at most the vocabulary size {vocab_size}, got {top_k}.")


def _check_scores(**named: Tensor | None) -> None:
    """Floating tensors of finite numbers or ``-inf``; one device sync for all of them."""
    present = {name: check_tensor(value, name, floating=True) for name, value in named.items() if value is not None}
    device = next(iter(present.values())).device
    flags = [(torch.isnan(v) | torch.isposinf(v)).any().to(device) for v in present.values()]
    if bool(torch.stack(flags).any()):
        for name, value in present.items():
            check_logits(value, name)


def as_probabilities(
    output: Any, num_texts: int, label: int | None = None, name: str = "classifier"
) -> Tensor:
    """Check a classifier's answer for ``num_texts`` texts; return ``p(attribute)`` as ``(N,)`` float32.

    Accepts shape ``(N,)`` or ``(N, 1)`` (the attribute's probability) or ``(N, C)`` with
    ``label`` picking the attribute's column. Raises ``ValueError`` naming ``name`` for a
    wrong shape, NaN/inf, or values outside ``[0, 1]`` (beyond a round-off tolerance of 1e-4;
    values within it are clamped).

    Args:
        output (Any): the classifier's answer (tensor, array or nested list of real numbers).
        num_texts (int): how many texts were classified, an integer ``>= 0``.
        label (int | None): the attribute's column for ``(N, C)`` answers, in ``[-C, C)``.
        name (str): what to call the classifier in error messages.

    Example:
        >>> from guidance.classifier import as_probabilities
        >>> as_probabilities([[0.2, 0.8], [0.9, 0.1]], 2, label=1)
        tensor([0.8000, 0.1000])
    """
    num_texts = check_int(num_texts, "num_texts", minimum=0)
    if label is not None:
        label = check_int(label, "label")
    try:
        probs = torch.as_tensor(output)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"`{name}` must return probabilities as a tensor, array or list, got {type(output)}."
        ) from error
    if probs.is_complex():
        raise ValueError(f"`{name}` must return real probabilities, got dtype {probs.dtype}.")
    shape = tuple(probs.shape)
    probs = probs.detach().to(device="cpu", dtype=torch.float32)
    if probs.numel() and not bool(torch.isfinite(probs).all()):  # in any column, chosen or not
        raise ValueError(f"`{name}` returned NaN or infinite probabilities: {probs.flatten().tolist()[:8]}.")
    if probs.ndim == 2 and probs.shape[1] == 1:
        probs = probs[:, 0]
    if probs.ndim == 2:
        if label is None:
            raise ValueError(
                f"`{name}` returned {tuple(probs.shape)} class probabilities; pass `label` to pick the attribute's column."
            )
        if not -probs.shape[1] <= label < probs.shape[1]:
            raise ValueError(
                f"`label` must be in [0, {probs.shape[1]}) for {probs.shape[1]} classes, got {label}."
            )
        probs = probs[:, label]
    if probs.shape != (num_texts,):
        raise ValueError(
            f"`{name}` must return probabilities of shape ({num_texts},) or ({num_texts}, num_classes) "
            f"for {num_texts} texts, got {shape}."
        )
    if bool((probs < -_PROB_TOLERANCE).any()) or bool((probs > 1 + _PROB_TOLERANCE).any()):
        raise ValueError(
            f"`{name}` must return probabilities in [0, 1], got values in [{probs.min().item():.4g}, {probs.max().item():.4g}]."
        )
    return probs.clamp(0.0, 1.0)


def attribute_log_probs(probs: Tensor) -> Tensor:
    """``log p`` with ``p`` clamped to ``[tiny, 1]`` (``tiny`` the smallest normal float32), so it is always finite.

    Args:
        probs (Tensor): probabilities, a real tensor of any shape (NaN raises ``ValueError``).

    Example:
        >>> import torch
        >>> from guidance.classifier import attribute_log_probs
        >>> attribute_log_probs(torch.tensor([1.0, 0.0]))
        tensor([  0.0000, -87.3365])
    """
    check_tensor(probs, "probs")
    probs = check_no_nan(probs.to(torch.float32), "probs")
    return torch.log(probs.clamp(min=_MIN_PROB, max=1.0))


def entropy(scores: Tensor) -> Tensor:
    """Entropy in nats of ``softmax(scores)`` over the last dim; ``-inf`` entries count as 0.

    Args:
        scores (Tensor): ``(..., V)`` floating scores, finite or ``-inf`` (NaN/``+inf``: ``ValueError``).

    Returns:
        Tensor: ``(...)`` entropies in float32 at least; a row masked everywhere has entropy 0.

    Example:
        >>> import torch
        >>> from guidance.classifier import entropy
        >>> entropy(torch.tensor([[0.0, 0.0], [0.0, -float("inf")]]))
        tensor([0.6931, 0.0000])
    """
    _check_scores(scores=scores)
    log_p = torch.log_softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1) + 0.0  # + 0.0: no -0.0


def top_k_candidates(scores: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Indices ``(B, K)`` of each row's ``top_k`` highest scores and a mask of the finite ones.

    Candidates with a ``-inf`` score (masked by an earlier processor) are flagged so that
    they need not be scored: they stay ``-inf`` whatever the classifier says.

    Args:
        scores (Tensor): ``(..., V)`` floating scores, finite or ``-inf`` (NaN/``+inf``: ``ValueError``).
        top_k (int): the number of candidates, in ``[1, V]``.

    Example:
        >>> import torch
        >>> from guidance.classifier import top_k_candidates
        >>> top_k_candidates(torch.tensor([[0.0, 2.0, -float("inf")]]), 2)
        (tensor([[1, 0]]), tensor([[True, True]]))
    """
    _check_scores(scores=scores)
    validate_top_k(top_k, scores.shape[-1])
    values, indices = torch.topk(scores, top_k, dim=-1)
    return indices, torch.isfinite(values)


def classifier_weighted_logits(
    scores: Tensor,
    candidate_ids: Tensor,
    candidate_log_probs: Tensor,
    alpha: float,
    *,
    outside_top_k: OutsideTopK = "remove",
    prefix_log_probs: Tensor | None = None,
    filter_value: float = -math.inf,
) -> Tensor:
    """CAIF/FUDGE reweighting: ``scores[b, v] + alpha * log p(attribute | prefix_b + v)`` for the candidates.

    Args:
        scores: ``(B, V)`` next-token scores (logits or log-probs).
        candidate_ids: ``(B, K)`` token ids whose ``prefix + token`` texts were classified.
        candidate_log_probs: ``(B, K)`` ``log p(attribute | prefix + token)`` (see
            :func:`attribute_log_probs`).
        alpha: classifier weight, a finite number; negative steers away; ``0`` returns ``scores`` itself.
        outside_top_k: ``"remove"`` (default, CAIF/FUDGE) sets every other token to
            ``filter_value``; ``"prefix"`` keeps them and adds ``alpha * prefix_log_probs``.
        prefix_log_probs: ``(B,)`` ``log p(attribute | prefix)``, needed for ``"prefix"``.
        filter_value: the score of removed tokens, a number (``-inf`` allowed; NaN and ``+inf`` not).

    ``candidate_ids`` must be integer ids in ``[0, V)`` without repeats in a row (``ValueError``).
    Log-probabilities are clamped below at ``log(tiny)`` as in :func:`attribute_log_probs`, so a
    weight times a log-probability is always finite. Returns float32 (or wider) scores; ``-inf``
    scores stay ``-inf``.

    Example:
        >>> import torch
        >>> from guidance.classifier import classifier_weighted_logits
        >>> scores = torch.tensor([[2.0, 1.0, 0.0]])
        >>> ids, log_p = torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.25, 1.0]]))
        >>> classifier_weighted_logits(scores, ids, log_p, alpha=1.0)
        tensor([[0.6137, 1.0000,   -inf]])
    """
    alpha = check_finite(alpha, "alpha")
    check_choice(outside_top_k, "outside_top_k", OUTSIDE_TOP_K)
    filter_value = check_range(filter_value, "filter_value", -math.inf, math.inf, hi_open=True)
    check_tensor(scores, "scores", floating=True)
    if scores.ndim != 2:
        raise ValueError(f"`scores` must have shape (batch, vocab), got {tuple(scores.shape)}.")
    check_tensor(candidate_ids, "candidate_ids", real=True)
    if candidate_ids.is_floating_point():
        raise TypeError(f"`candidate_ids` must be an integer tensor, got dtype {candidate_ids.dtype}.")
    check_tensor(candidate_log_probs, "candidate_log_probs", floating=True)
    if candidate_ids.shape != candidate_log_probs.shape or candidate_ids.ndim != 2 or candidate_ids.shape[0] != scores.shape[0]:
        raise ValueError(
            f"`candidate_ids` {tuple(candidate_ids.shape)} and `candidate_log_probs` "
            f"{tuple(candidate_log_probs.shape)} must both be (batch={scores.shape[0]}, k)."
        )
    if outside_top_k == "prefix" and (
        not isinstance(prefix_log_probs, Tensor) or prefix_log_probs.shape != (scores.shape[0],)
    ):
        raise ValueError(
            f"`prefix_log_probs` of shape ({scores.shape[0]},) is required with outside_top_k='prefix'."
        )
    _check_candidate_ids(candidate_ids, scores.shape[-1])
    _check_scores(
        scores=scores,
        candidate_log_probs=candidate_log_probs,
        prefix_log_probs=prefix_log_probs if outside_top_k == "prefix" else None,
    )
    if alpha == 0:
        return scores
    dtype = torch.promote_types(scores.dtype, torch.float32)
    scores = scores.to(dtype)
    floor = math.log(_MIN_PROB)
    bonus = alpha * candidate_log_probs.to(device=scores.device, dtype=dtype).clamp(min=floor)
    guided_candidates = scores.gather(-1, candidate_ids) + bonus
    if outside_top_k == "remove":
        out = torch.full_like(scores, filter_value)
    else:
        prefix = prefix_log_probs.to(device=scores.device, dtype=dtype).clamp(min=floor)
        out = scores + alpha * prefix[:, None]
    return out.scatter(-1, candidate_ids, guided_candidates)


def _check_candidate_ids(candidate_ids: Tensor, vocab_size: int) -> None:
    if candidate_ids.numel() == 0:
        return
    low, high = int(candidate_ids.min()), int(candidate_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"`candidate_ids` must be token ids in [0, {vocab_size}), got values in [{low}, {high}].")
    ordered = candidate_ids.sort(dim=-1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("`candidate_ids` must not repeat a token within a row.")


def gedi_class_log_probs(
    next_token_log_probs: Tensor,
    prefix_log_likelihood: Tensor,
    num_prefix_tokens: int | Tensor,
    *,
    class_bias: Tensor | Sequence[float] | None = None,
    logit_scale: float = 1.0,
    length_normalize: bool = True,
) -> Tensor:
    """GeDi's Bayes rule: ``log p(class | prefix + v)`` for every class, row and token ``v``.

    Args:
        next_token_log_probs: ``(C, B, V)`` ``log P(v | prefix, class)`` from the
            class-conditional LM (log-softmaxed over ``V``); finite or ``-inf``.
        prefix_log_likelihood: ``(C, B)`` ``sum_j log P(x_j | x_<j, class)`` over the
            prefix tokens scored so far; finite or ``-inf``.
        num_prefix_tokens: how many tokens that sum covers, an integer ``>= 0`` or a ``(B,)``
            tensor of counts ``>= 0``; the score is divided by ``num_prefix_tokens + 1`` when
            ``length_normalize``.
        class_bias: ``(C,)`` finite numbers added after normalisation (GeDi's ``bias``/``class_bias``;
            a log prior over classes). Default: none (uniform prior).
        logit_scale: GeDi's ``logit_scale`` multiplying the normalised log-likelihoods, a finite number
            ``>= 0`` (``0``: the likelihoods carry no weight, the posterior is the prior among the classes
            that can produce the token; negative values would favour the impossible classes).
        length_normalize: divide by the number of scored tokens (GeDi's default).

    Returns ``(C, B, V)`` log-probabilities that sum to one over ``C``. A token that every
    class LM gives ``-inf`` gets the prior ``log_softmax(class_bias)`` (never NaN).

    Example:
        >>> import torch
        >>> from guidance.classifier import gedi_class_log_probs
        >>> lp = torch.log(torch.tensor([[[0.5, 0.5]], [[0.1, 0.9]]]))  # 2 classes, 1 row, 2 tokens
        >>> gedi_class_log_probs(lp, torch.zeros(2, 1), 0).exp()
        tensor([[[0.8333, 0.3571]],
        <BLANKLINE>
                [[0.1667, 0.6429]]])
    """
    check_tensor(next_token_log_probs, "next_token_log_probs", floating=True)
    if next_token_log_probs.ndim != 3:
        raise ValueError(
            f"`next_token_log_probs` must be (classes, batch, vocab), got {tuple(next_token_log_probs.shape)}."
        )
    num_classes, batch = next_token_log_probs.shape[:2]
    if num_classes < 2:
        raise ValueError(f"GeDi needs at least 2 classes, got {num_classes}.")
    check_tensor(prefix_log_likelihood, "prefix_log_likelihood", floating=True)
    if prefix_log_likelihood.shape != (num_classes, batch):
        raise ValueError(
            f"`prefix_log_likelihood` must be ({num_classes}, {batch}), got {tuple(prefix_log_likelihood.shape)}."
        )
    logit_scale = check_range(logit_scale, "logit_scale", 0.0, math.inf, hi_open=True)
    check_bool(length_normalize, "length_normalize")
    dtype = torch.promote_types(next_token_log_probs.dtype, torch.float32)
    device = next_token_log_probs.device
    count = _prefix_counts(num_prefix_tokens, batch, device, dtype)
    bias = _class_bias(class_bias, num_classes, device, dtype)
    _check_scores(next_token_log_probs=next_token_log_probs, prefix_log_likelihood=prefix_log_likelihood)
    total = prefix_log_likelihood.to(device=device, dtype=dtype)[..., None] + next_token_log_probs.to(dtype)
    if length_normalize:
        total = total / count
    if logit_scale != 1:  # a class with no likelihood stays impossible, also at logit_scale 0
        total = torch.where(torch.isneginf(total), total, total * logit_scale)
    total = total + bias[:, None, None]
    no_evidence = torch.isneginf(total).all(dim=0, keepdim=True)
    posterior = torch.log_softmax(total, dim=0)
    prior = torch.log_softmax(bias, dim=0)[:, None, None].expand_as(posterior)
    return torch.where(no_evidence, prior, posterior)


def _prefix_counts(num_prefix_tokens: int | Tensor, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``num_prefix_tokens + 1`` as a tensor broadcasting against ``(C, B, V)``."""
    if isinstance(num_prefix_tokens, Tensor):
        check_tensor(num_prefix_tokens, "num_prefix_tokens", real=True)
        if num_prefix_tokens.ndim > 1 or num_prefix_tokens.numel() not in (1, batch):
            raise ValueError(
                f"`num_prefix_tokens` must be an integer or a ({batch},) tensor, got shape {tuple(num_prefix_tokens.shape)}."
            )
        check_tensor_range(num_prefix_tokens, "num_prefix_tokens", 0.0, math.inf)
        return (num_prefix_tokens.to(device=device, dtype=dtype) + 1).reshape(1, -1, 1)
    return torch.tensor(check_int(num_prefix_tokens, "num_prefix_tokens", minimum=0) + 1, device=device, dtype=dtype)


def _class_bias(class_bias: Any, num_classes: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if class_bias is None:
        return torch.zeros(num_classes, device=device, dtype=dtype)
    try:
        bias = torch.as_tensor(class_bias, device=device, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"`class_bias` must be {num_classes} real numbers, got {class_bias!r}.") from error
    if bias.shape != (num_classes,) or not bool(torch.isfinite(bias).all()):
        raise ValueError(f"`class_bias` must be {num_classes} finite numbers, got {bias.tolist()}.")
    return bias


def gedi_logits(scores: Tensor, desired_log_probs: Tensor, omega: float) -> Tensor:
    """``scores + omega * log p(desired class | prefix + v)``; ``omega = 0`` returns ``scores``.

    ``desired_log_probs`` is clamped below at ``log(tiny)`` so a zero class probability is a
    large finite penalty (bonus for negative ``omega``), never ``inf``.

    Args:
        scores (Tensor): next-token scores, floating, finite or ``-inf`` (NaN/``+inf``: ``ValueError``).
        desired_log_probs (Tensor): ``log p(desired | prefix + v)``, same shape, finite or ``-inf``.
        omega (float): the class weight, a finite number (``0``: off, ``scores`` itself is returned).

    Returns float32 (or wider) scores; ``-inf`` scores stay ``-inf``.

    Example:
        >>> import torch
        >>> from guidance.classifier import gedi_logits
        >>> gedi_logits(torch.tensor([[1.0, 1.0]]), torch.log(torch.tensor([[0.5, 1.0]])), 2.0)
        tensor([[-0.3863,  1.0000]])
    """
    omega = check_finite(omega, "omega")
    check_tensor(scores, "scores", floating=True)
    check_tensor(desired_log_probs, "desired_log_probs", floating=True)
    if desired_log_probs.shape != scores.shape:
        raise ValueError(
            f"`desired_log_probs` must have the shape of `scores` {tuple(scores.shape)}, got {tuple(desired_log_probs.shape)}."
        )
    if omega == 0:
        return scores
    _check_scores(scores=scores, desired_log_probs=desired_log_probs)
    dtype = torch.promote_types(scores.dtype, torch.float32)
    floor = math.log(_MIN_PROB)
    return scores.to(dtype) + omega * desired_log_probs.to(dtype).clamp(min=floor)
