"""Denoiser inputs of a prompt, for the extra branches of :func:`~guidance.diffusion.attach` (Perp-Neg's negative)."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["prompt_inputs"]


def prompt_inputs(pipe: Any, prompt: str, **encode_kwargs: Any) -> dict[str, Any]:
    """The conditioning inputs of ``prompt`` as its denoiser receives them, one row (shared by every sample).

    Uses the pipeline's own ``encode_prompt`` and maps its outputs to the denoiser's argument names:
    ``encoder_hidden_states`` (Stable Diffusion), plus ``added_cond_kwargs["text_embeds"]`` (SDXL)
    or ``pooled_projections`` (SD3). Pass the same text-length options as to the pipeline in
    ``encode_kwargs`` (e.g. ``max_sequence_length=`` for SD3) so the branch batches with the others.

    Args:
        pipe: a text-to-image pipeline with ``encode_prompt`` and a ``unet`` or ``transformer``.
        prompt (str): the text.
        **encode_kwargs: passed on to ``pipe.encode_prompt``.

    Example:
        >>> from guidance.diffusion import prompt_inputs
        >>> from guidance.diffusion.testing import tiny_stable_diffusion
        >>> inputs = prompt_inputs(tiny_stable_diffusion(), "blurry")
        >>> list(inputs), tuple(inputs["encoder_hidden_states"].shape)
        (['encoder_hidden_states'], (1, 16, 32))
    """
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a string, got {type(prompt).__name__}.")
    encode = getattr(pipe, "encode_prompt", None)
    module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if not callable(encode) or module is None:
        raise ValueError(
            f"{type(pipe).__name__} has no `encode_prompt` and denoiser to build prompt inputs for."
        )
    accepted = inspect.signature(encode).parameters
    options = {
        "prompt": prompt,
        "device": module.device,
        "num_images_per_prompt": 1,
        "do_classifier_free_guidance": False,
    }
    options.update({name: None for name in ("prompt_2", "prompt_3") if name in accepted})
    options.update(encode_kwargs)
    outputs = encode(**options)
    embeds = outputs[0]
    forward = inspect.signature(module.forward).parameters
    if len(outputs) >= 4 and "pooled_projections" in forward:
        return {"encoder_hidden_states": embeds, "pooled_projections": outputs[2]}
    if len(outputs) >= 4 and "added_cond_kwargs" in forward:
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": outputs[2]}}
    return {"encoder_hidden_states": embeds}
