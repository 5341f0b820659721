"""Guidance away from a perturbed (weaker) prediction: PAG, SEG, SLG/STG, TPG, S^2-Guidance, AutoGuidance.

All these methods evaluate the conditional prediction ``c`` a second time with a degraded
network (attention map replaced by the identity, blurred queries, skipped blocks, shuffled
tokens, a smaller model) and push the sample away from that degraded prediction ``p``. The
combine is the same for all of them; the perturbation is what differs (see
:mod:`guidance.diffusion.perturbations`).

Conventions (``w``: CFG scale as in :mod:`guidance.ops`, ``s``: perturbation scale):

* ``"paper"`` (default; PAG, SEG, TPG papers, diffusers' PAG *pipelines*):
  ``g = u + w (c - u) + s (c - p)``, and without ``uncond`` ``g = c + s (c - p)``.
  ``s = 0`` is perturbation off.
* ``"diffusers"`` (diffusers' ``PerturbedAttentionGuidance`` / ``SkipLayerGuidance`` /
  ``SmoothedEnergyGuidance`` guiders): the same with CFG on; without ``uncond`` it computes
  ``p + s (c - p)``, i.e. the paper's form at ``s - 1``.
"""

from __future__ import annotations

from torch import Tensor

from guidance.ops._common import Scale, _as_batch_scale, _check_pair, validate_scale
from guidance.validation import check_choice, check_tensor

__all__ = ["PERTURBED_CONVENTIONS", "perturbed_guidance", "autoguidance"]

PERTURBED_CONVENTIONS = ("paper", "diffusers")


def perturbed_guidance(
    cond: Tensor,
    uncond: Tensor | None,
    perturbed: Tensor | None,
    scale: Scale,
    perturbed_scale: Scale,
    *,
    convention: str = "paper",
) -> Tensor:
    """CFG plus a push away from a perturbed prediction: ``u + w (c - u) + s (c - p)``.

    Args:
        cond (Tensor): conditional prediction ``c``.
        uncond (Tensor | None): unconditional prediction ``u``; ``None`` means CFG is off.
        perturbed (Tensor | None): the perturbed conditional prediction ``p``; ``None`` means off.
        scale (float | Tensor): CFG scale ``w`` (any finite real; ignored without ``uncond``).
        perturbed_scale (float | Tensor): perturbation scale ``s`` (any finite real; ignored
            without ``perturbed``).
        convention (str): ``"paper"`` or ``"diffusers"`` (module docstring).

    Returns ``cond`` itself when both parts are off (``uncond`` and ``perturbed`` are ``None``).

    Example:
        >>> import torch
        >>> from guidance.ops import perturbed_guidance
        >>> c, u, p = torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[1.5]])
        >>> perturbed_guidance(c, u, p, 3.0, 2.0)
        tensor([[5.]])
        >>> perturbed_guidance(c, None, p, 3.0, 2.0)  # paper: c + s (c - p)
        tensor([[3.]])
        >>> perturbed_guidance(c, None, p, 3.0, 2.0, convention="diffusers")  # p + s (c - p)
        tensor([[2.5000]])
    """
    check_tensor(cond, "cond")
    check_choice(convention, "convention", PERTURBED_CONVENTIONS)
    validate_scale(scale, "scale")
    validate_scale(perturbed_scale, "perturbed_scale")
    if uncond is not None:
        _check_pair(cond, check_tensor(uncond, "uncond"))
    if perturbed is not None:
        _check_pair(cond, check_tensor(perturbed, "perturbed"))
    if uncond is None and perturbed is None:
        return cond
    s = _as_batch_scale(perturbed_scale, cond)
    if uncond is None:
        base = perturbed if convention == "diffusers" else cond
        return base + s * (cond - perturbed)
    w = _as_batch_scale(scale, cond)
    guided = uncond + w * (cond - uncond)
    return guided if perturbed is None else guided + s * (cond - perturbed)


def autoguidance(cond: Tensor, weak: Tensor, scale: Scale) -> Tensor:
    """AutoGuidance (Karras et al. 2024): ``g = p_weak + w (c - p_weak)``, ``w = 1`` returns ``cond``.

    ``weak`` is a weaker model's prediction under the same condition (or, in diffusers'
    ``AutoGuidance``, the model with layers skipped on the unconditional inputs).

    Example:
        >>> import torch
        >>> from guidance.ops import autoguidance
        >>> autoguidance(torch.tensor([[2.0]]), torch.tensor([[1.0]]), 2.0)
        tensor([[3.]])
    """
    check_tensor(cond, "cond")
    _check_pair(cond, check_tensor(weak, "weak"))
    validate_scale(scale, "scale")
    if not isinstance(scale, Tensor) and scale == 1:
        return cond
    w = _as_batch_scale(scale, cond)
    return weak + w * (cond - weak)
