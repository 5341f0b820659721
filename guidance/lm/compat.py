"""Everything version-specific about transformers, in one place.

The transformers adapter runs on transformers' public surface: ``custom_generate``, model
``forward``, ``DynamicCache`` and its ``reorder_cache``, logits processors, stopping criteria
and the ``Generate*Output`` classes. What is version-specific or private lives here, and
``tests/test_lm_compat.py`` fails, naming the installed version, when it changes:

- the tested version range, checked when :mod:`guidance.lm` is imported;
- the keyword under which ``forward`` takes the KV cache (``past_key_values`` up to 5.2x,
  ``cache`` from later 5.x, where the old name warns);
- the settings of transformers' own CFG processor, read from its attributes (the route by
  which ``guidance_scale`` and ``negative_prompt_ids`` reach a callable ``custom_generate``);
- the one private call: with guidance off, ``cfg_generate`` hands over to the decoding method
  ``generate`` itself would have run (``GenerationMixin._sample`` / ``_beam_search``), so that
  guidance off is transformers' own decoding, bit for bit, in every version.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from typing import Any

import torch

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "TESTED_TRANSFORMERS",
    "cache_argument",
    "check_transformers_version",
    "run_transformers_decoding",
    "transformers_cfg_settings",
]

#: Lowest and highest transformers versions the LM tests run against (both inclusive; CI tests both).
TESTED_TRANSFORMERS = ("5.0.0", "5.24.0")
#: Set to 1 to downgrade the refusal of an untested transformers to a warning.
ALLOW_UNTESTED_ENV = "GUIDANCE_ALLOW_UNTESTED_TRANSFORMERS"


def _release(version: str) -> tuple[int, int, int]:
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"cannot parse the transformers version {version!r}")
    return tuple(int(part or 0) for part in match.groups())  # type: ignore[return-value]


def check_transformers_version(version: str | None = None) -> None:
    """Refuse a transformers outside :data:`TESTED_TRANSFORMERS` with an ``ImportError``.

    Args:
        version (`str`, *optional*): the version to check; default: the installed one.

    With ``GUIDANCE_ALLOW_UNTESTED_TRANSFORMERS=1`` in the environment it warns instead.
    Pre-releases count as their release (``5.25.0.dev0`` is 5.25.0).
    """
    if version is None:
        import transformers

        version = transformers.__version__
    low, high = TESTED_TRANSFORMERS
    if _release(low) <= _release(version) <= _release(high):
        return
    message = (
        f"guidance.lm is tested with transformers {low} to {high}; transformers {version} is installed. "
        f'Install a tested version (pip install "transformers>={low},<={high}"), or set '
        f"{ALLOW_UNTESTED_ENV}=1 to run anyway."
    )
    if os.environ.get(ALLOW_UNTESTED_ENV, "") in ("1", "true", "yes"):
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    raise ImportError(message)


def cache_argument(model: Any) -> str:
    """The keyword under which ``model.forward`` takes the KV cache: ``"cache"`` or ``"past_key_values"``."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise ValueError(
        f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`; cfg_generate needs a KV cache."
    )


def transformers_cfg_settings(processor: Any) -> tuple[float, torch.Tensor | None, torch.Tensor | None] | None:
    """``(guidance_scale, negative_ids, negative_mask)`` of transformers' CFG processor, else ``None``.

    ``generate`` turns ``guidance_scale`` (!= 1), ``negative_prompt_ids`` and
    ``negative_prompt_attention_mask`` into an ``UnbatchedClassifierFreeGuidanceLogitsProcessor``
    and passes a callable ``custom_generate`` only the processor list. ``negative_ids`` is
    ``None`` when no negative prompt was given (transformers then uses the last prompt token).
    """
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    if not isinstance(processor, UnbatchedClassifierFreeGuidanceLogitsProcessor):
        return None
    context = processor.unconditional_context  # filled with the last prompt token only when the processor runs
    return float(processor.guidance_scale), context["input_ids"], context["attention_mask"]


_DECODING_METHODS = {"greedy": "_sample", "sample": "_sample", "beam": "_beam_search"}


def run_transformers_decoding(
    model: Any,
    mode: str,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    streamer: Any = None,
    **model_kwargs: Any,
) -> Any:
    """Run the decoding loop ``generate`` would have run for ``mode`` (``greedy``, ``sample``, ``beam``).

    The only private call of the adapter: transformers offers no public way to continue a
    ``generate`` call from inside ``custom_generate``, and re-entering ``generate`` would
    rebuild (and warn about) every processor. Used only with guidance off.
    """
    from transformers import GenerationMixin

    method = getattr(GenerationMixin, _DECODING_METHODS[mode])
    if streamer is not None and mode != "beam":
        model_kwargs["streamer"] = streamer
    return method(
        model,
        input_ids,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        generation_config=generation_config,
        **model_kwargs,
    )


check_transformers_version()
