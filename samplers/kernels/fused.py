"""When a list of logits warpers can be replaced by the fused CFG + temperature + typical + draw call.

transformers' sampling loop applies its warpers to the guided scores and then draws with
``torch.multinomial``. When every warper after the CFG combine is one that
:func:`samplers.kernels.cfg_typical_sample` fuses, the whole step (combine, warpers, draw)
is one call: :func:`fused_warpers_supported` says whether (and with which settings), and
:meth:`FusedSampling.sample` makes the call. Warpers are recognised by type, without
importing transformers: transformers' classes are looked up in ``sys.modules`` only.

Fused: ``TemperatureLogitsWarper`` (a temperature >= 1e-5), then at most one typical warper
(transformers' ``TypicalLogitsWarper`` or :class:`samplers.typical.LocallyTypicalWarper`)
with ``filter_value = -inf``. Anything else (top-k, top-p, min-p, repetition penalties,
a typical warper before the temperature, a finite ``filter_value``) is not fused.

The fused draw keeps transformers' token set except where its float32 running sum rounds
across the mass (see :mod:`samplers.typical`), and draws with its own uniforms, so the tokens
differ from ``torch.multinomial``'s for the same torch seed: use it only while guiding, so that
guidance off stays bit-identical to plain ``generate``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from samplers.kernels.reference import (
    MIN_TEMPERATURE,
    validate_mass,
    validate_min_tokens_to_keep,
    validate_temperature,
)

__all__ = ["FusedSampling", "fused_warpers_supported"]


@dataclass(frozen=True)
class FusedSampling:
    """The settings of one fused CFG + temperature + typical + draw step.

    Args:
        temperature (`float`, *optional*, defaults to 1.0): in [1e-5, inf).
        mass (`float`, *optional*, defaults to 1.0): ``typical_p`` in (0, 1]; 1 draws from the
            full tempered distribution.
        min_tokens_to_keep (`int`, *optional*, defaults to 1): >= 1.

    Example:
        >>> import torch
        >>> from samplers.kernels import FusedSampling
        >>> step = FusedSampling(temperature=0.7, mass=0.9)
        >>> cond, uncond = torch.tensor([[0.0, 6.0, 0.0]]), torch.zeros(1, 3)
        >>> step.sample(cond, uncond, 1.5, seed=0)
        tensor([1])
    """

    temperature: float = 1.0
    mass: float = 1.0
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", validate_temperature(self.temperature))
        object.__setattr__(self, "mass", validate_mass(self.mass))
        object.__setattr__(self, "min_tokens_to_keep", validate_min_tokens_to_keep(self.min_tokens_to_keep))

    def sample(
        self,
        cond_logits: Tensor,
        uncond_logits: Tensor | None,
        scale: float | Tensor,
        *,
        seed: int | Tensor | None = None,
        generator: torch.Generator | None = None,
        check_finite: bool = True,
    ) -> Tensor:
        """:func:`samplers.kernels.cfg_typical_sample` with these settings (see it for every argument).

        Args:
            cond_logits (`torch.Tensor`): ``(batch, vocab)`` conditional logits.
            uncond_logits (`torch.Tensor` or None): unconditional logits of the same shape.
            scale (`float` or `torch.Tensor`): guidance scale (number or ``(batch,)``), finite.
            seed (`int` or `torch.Tensor`, *optional*): per-call seed(s), see ``cfg_typical_sample``.
            generator (`torch.Generator`, *optional*): source of the uniforms when no seed.
            check_finite (`bool`, *optional*, defaults to `True`): raise on NaN / ``+inf``
                logits and empty rows; ``False`` returns ``-1`` for them without a read-back.

        Returns:
            `torch.LongTensor`: ``(batch,)`` token ids.
        """
        from samplers.kernels import cfg_typical_sample

        return cfg_typical_sample(
            cond_logits,
            uncond_logits,
            scale,
            self.mass,
            temperature=self.temperature,
            min_tokens_to_keep=self.min_tokens_to_keep,
            seed=seed,
            generator=generator,
            check_finite=check_finite,
        )


def _transformers_class(name: str) -> type | None:
    module = sys.modules.get("transformers.generation.logits_process")
    return getattr(module, name, None) if module is not None else None


def _is(processor: object, names: tuple[str, ...]) -> bool:
    from samplers.typical import LocallyTypicalWarper

    ours = {"LocallyTypicalWarper": LocallyTypicalWarper}
    return any(
        (cls := ours.get(name) or _transformers_class(name)) is not None and type(processor) is cls
        for name in names
    )


def fused_warpers_supported(processors: Iterable[object]) -> FusedSampling | None:
    """The fused settings equivalent to these warpers, or None if they cannot all be fused.

    ``processors`` are the logits processors/warpers that run after the CFG combine, in order
    (a transformers ``LogitsProcessorList`` or any iterable). Fusable: at most one
    ``TemperatureLogitsWarper``, then at most one typical warper (``TypicalLogitsWarper`` or
    :class:`~samplers.typical.LocallyTypicalWarper`) whose ``filter_value`` is ``-inf``. An empty
    list fuses to plain sampling (``FusedSampling()``).

    Args:
        processors (`Iterable`): the processors, in the order they run.

    Returns:
        :class:`FusedSampling` or None.

    Example:
        >>> from samplers.kernels import fused_warpers_supported
        >>> from samplers.typical import LocallyTypicalWarper
        >>> fused_warpers_supported([LocallyTypicalWarper(0.9)])
        FusedSampling(temperature=1.0, mass=0.9, min_tokens_to_keep=1)
        >>> fused_warpers_supported([LocallyTypicalWarper(0.9), object()]) is None
        True
    """
    temperature, typical = None, None
    for processor in processors:
        if _is(processor, ("TemperatureLogitsWarper",)) and temperature is None and typical is None:
            temperature = float(processor.temperature)
        elif _is(processor, ("TypicalLogitsWarper", "LocallyTypicalWarper")) and typical is None:
            if float(processor.filter_value) != -math.inf:
                return None
            typical = processor
        else:
            return None
    if temperature is not None and not (MIN_TEMPERATURE <= temperature < math.inf):
        return None
    return FusedSampling(
        temperature=1.0 if temperature is None else temperature,
        mass=1.0 if typical is None else float(typical.mass),
        min_tokens_to_keep=1 if typical is None else int(typical.min_tokens_to_keep),
    )
