"""NAG: cross-attention that also attends to a negative context and guides away from it (Normalized Attention Guidance).

In every chosen cross-attention layer, the branch's rows run the layer's own processor twice:
once with the negative context (``negative``, e.g. a negative prompt's text embeddings) and
once with the positive one the denoiser was called with. The two attention outputs, taken as
the input of the output projection ``to_out[0]``, are combined by
:func:`guidance.ops.normalized_attention_guidance`, and the layer continues with the guided
output. Reusing the layer's own processor keeps whatever attention kernel, masking or
normalisation it has; only the extra cross-attention costs anything (about one more
cross-attention per layer for the branch's rows, not a second forward).

Only attention modules with a separate context (diffusers ``Attention`` with
``is_cross_attention``: the ``attn2`` layers of SD/SDXL UNets and of PixArt-style transformers)
are changed. Joint text+image attention (SD3, Flux) has no such layer: its text tokens evolve
through the blocks, so the negative context would have to run through the whole network as a
second text stream (the official Flux implementation does this); that is not supported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from guidance.ops.nag import check_nag_settings, normalized_attention_guidance
from guidance.perturbations._common import Layers, RowProcessor, layer_matcher
from guidance.perturbations.hooks import AttentionProcessors
from guidance.validation import check_tensor

__all__ = ["NormalizedCrossAttention", "is_cross_attention", "negative_context"]


def is_cross_attention(module: Any) -> bool:
    """A diffusers attention module whose keys and values come from a separate context (``attn2``)."""
    return (
        callable(getattr(module, "set_processor", None))
        and bool(getattr(module, "is_cross_attention", False))
        and hasattr(module, "to_out")
    )


def negative_context(negative: Any, name: str = "negative") -> Tensor:
    """The negative context tensor from ``negative``: a tensor, or denoiser inputs with ``encoder_hidden_states``.

    ``(batch or 1, tokens, features)``; :func:`~guidance.diffusion.prompt_inputs` builds the mapping
    from a prompt (its other entries, pooled embeddings, are not used by cross-attention).

    Example:
        >>> import torch
        >>> from guidance.perturbations.normalized_attention import negative_context
        >>> negative_context({"encoder_hidden_states": torch.zeros(1, 4, 8)}).shape
        torch.Size([1, 4, 8])
    """
    if isinstance(negative, Mapping):
        if "encoder_hidden_states" not in negative:
            raise ValueError(
                f"`{name}` must hold 'encoder_hidden_states' (the negative context of cross-attention), "
                f"got keys {list(negative)}."
            )
        negative = negative["encoder_hidden_states"]
    check_tensor(negative, name, floating=True)
    if negative.ndim != 3:
        raise ValueError(
            f"`{name}` must have shape (batch or 1, tokens, features), got {tuple(negative.shape)}."
        )
    return negative


class _Guided:
    """The processor function for the branch's rows: the original processor, run with both contexts."""

    def __init__(self, hook: NormalizedCrossAttention, original: Any, name: str):
        self.hook, self.original, self.name = hook, original, name

    def __call__(self, attn: Any, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        context = kwargs.get("encoder_hidden_states")
        if context is None:  # called as self-attention: nothing to guide
            return self.original(attn, hidden_states, *args, **kwargs)
        negative = self.hook.context_rows(hidden_states.shape[0], context)
        # The negative context has its own tokens: the positive prompt's mask does not apply to it.
        negative_kwargs = {**kwargs, "encoder_hidden_states": negative}
        negative_kwargs.pop("attention_mask", None)
        z_neg = self._capture(attn, hidden_states, args, negative_kwargs)
        hook = self.hook

        def guide(module: Any, inputs: tuple) -> tuple:
            z = normalized_attention_guidance(
                inputs[0], z_neg, hook.scale, tau=hook.tau, alpha=hook.alpha, norm=hook.norm
            )
            return (z, *inputs[1:])

        handle = attn.to_out[0].register_forward_pre_hook(guide)
        try:
            return self.original(attn, hidden_states, *args, **kwargs)
        finally:
            handle.remove()

    def _capture(self, attn: Any, hidden_states: Tensor, args: tuple, kwargs: dict) -> Tensor:
        captured: list[Tensor] = []

        def record(module: Any, inputs: tuple) -> None:
            captured.append(inputs[0])

        handle = attn.to_out[0].register_forward_pre_hook(record)
        try:
            self.original(attn, hidden_states, *args, **kwargs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"NAG: the processor {type(self.original).__name__} of layer {self.name!r} called its output "
                f"projection `to_out[0]` {len(captured)} times (expected once); NAG reads the attention "
                "output there and cannot guide this processor."
            )
        return captured[0]


class NormalizedCrossAttention(AttentionProcessors):
    """Hook: NAG in the cross-attention layers matched by ``layers`` (Normalized Attention Guidance).

    Args:
        negative (Tensor | Mapping | None): the negative context, ``(1 or batch, tokens, features)``
            (one row shared by every sample, or one per sample of the branch), or denoiser inputs
            with ``encoder_hidden_states`` (:func:`~guidance.diffusion.prompt_inputs`). ``None``:
            set :attr:`negative` before the hook is applied.
        scale (float): NAG scale ``s`` (finite; 1 is off). Default 5.
        tau (float): norm-ratio cap, ``> 0``. Default 2.5.
        alpha (float): blend weight in ``[0, 1]``. Default 0.25.
        norm (str): ``"l1"`` (default) or ``"l2"``.
        layers (str | Sequence[str] | Callable | None): which layers (see
            :func:`~guidance.perturbations.layer_matcher`); only cross-attention modules among the
            matches are changed. ``None`` (default): every cross-attention layer, as the paper.

    Acts per row (``per_row=True``): the rows of other branches sharing the call run the layer's
    own processor. ``scale`` may be changed between applications (a schedule sets it per step).

    Example:
        >>> import torch
        >>> from guidance.perturbations import NormalizedCrossAttention
        >>> hook = NormalizedCrossAttention(torch.zeros(1, 4, 8), scale=3.0)
        >>> hook.per_row, hook.scale
        (True, 3.0)
    """

    def __init__(
        self,
        negative: Any = None,
        *,
        scale: float = 5.0,
        tau: float = 2.5,
        alpha: float = 0.25,
        norm: str = "l1",
        layers: Layers | None = None,
    ):
        self.scale, self.tau, self.alpha, self.norm = check_nag_settings(scale, tau, alpha, norm)
        matcher = (lambda name, module: True) if layers is None else layer_matcher(layers)
        super().__init__(self._make, lambda n, m: is_cross_attention(m) and matcher(n, m), per_row=True)
        self.spec = layers
        self.negative = None if negative is None else negative_context(negative)

    def _make(self, name: str, original: Any, rows: slice | None) -> RowProcessor:
        return RowProcessor(original, _Guided(self, original, name), rows)

    def apply(self, module: Any, rows: slice | None) -> Any:
        if self.negative is None:
            raise ValueError(
                "NAG needs the negative context: set `negative=` (a tensor of text embeddings, or "
                "`guidance.diffusion.prompt_inputs(pipe, 'blurry')`)."
            )
        check_denoiser(module)
        return super().apply(module, rows)

    def context_rows(self, rows: int, like: Tensor) -> Tensor:
        """The negative context for ``rows`` rows, in ``like``'s dtype and device."""
        negative = self.negative.to(device=like.device, dtype=like.dtype)
        if negative.shape[0] == 1:
            return negative.expand(rows, *negative.shape[1:])
        if negative.shape[0] != rows:
            raise ValueError(
                f"The NAG negative context has {negative.shape[0]} rows but the branch has {rows}: give one "
                "row (shared by every sample) or one per sample."
            )
        return negative

    def __repr__(self) -> str:
        return (
            f"NormalizedCrossAttention(scale={self.scale}, tau={self.tau}, alpha={self.alpha}, "
            f"norm={self.norm!r}, layers={self.spec!r})"
        )


def check_denoiser(module: Any) -> None:
    """Raise ``ValueError`` unless ``module`` has a cross-attention layer NAG can act on.

    Example:
        >>> import torch
        >>> from guidance.perturbations.normalized_attention import check_denoiser
        >>> check_denoiser(torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        ValueError: NAG acts on cross-attention layers (a separate text context: the `attn2` layers of SD/SDXL UNets, PixArt); Linear has none. Joint-attention models (SD3, Flux) and models without a text context (DiT, UNet2DModel) are not supported.
    """
    if not any(is_cross_attention(sub) for _, sub in module.named_modules()):
        raise ValueError(
            "NAG acts on cross-attention layers (a separate text context: the `attn2` layers of SD/SDXL "
            f"UNets, PixArt); {type(module).__name__} has none. Joint-attention models (SD3, Flux) and models "
            "without a text context (DiT, UNet2DModel) are not supported."
        )
