"""NAG in joint text+image attention (SD3-style MMDiT): a negative text stream carried through the blocks.

In an MMDiT block the image tokens and the text tokens attend jointly over ``[image; text]``,
and the text tokens are updated block by block. NAG's negative context of a layer is therefore
the negative prompt *carried through every earlier block*, next to the positive one. As the
official implementation does for Flux, the negative text stream travels as extra rows of the
text stream:

* forward hooks on the transformer's ``context_embedder`` and ``time_text_embed`` append, for
  each guided row, one row of embedded negative text and one time embedding made from the row's
  timestep and the negative pooled embedding (the guided row's own pooled embedding where the
  negative has none); the image stream keeps its rows;
* the image stream's modulation (each block's ``norm1`` and the final ``norm_out``) takes only
  the first rows of the time embedding, those of the image rows (pre-hooks on those modules);
  the text stream's modulation (``norm1_context``) sees every row, the negative rows with the
  embedding of their own pooled negative;
* every joint attention runs the layer's own processor once on ``2k`` rows for the ``k``
  guided rows: the image tokens twice, with the positive and with the negative text rows. A
  pre-hook on ``to_out[0]`` replaces both image outputs by
  :func:`~guidance.ops.normalized_attention_guidance` of the two (in the layers chosen by
  ``layers``; elsewhere the positive output), so the negative text stream attends to the same
  image tokens as the positive one. The text outputs of both streams are kept.

The transformer returns its usual rows; every hook is removed on exit, also after an exception.
Duck-typed (diffusers is not imported): a transformer with ``transformer_blocks`` of joint
attention (``attn.add_k_proj``), ``context_embedder``, ``time_text_embed``, ``norm_out`` and a
``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)``: diffusers'
``SD3Transformer2DModel``. Flux (single-stream blocks after the joint ones) is not supported.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from guidance.ops.nag import normalized_attention_guidance
from guidance.perturbations._common import batch_rows

__all__ = ["is_joint_attention", "is_joint_transformer", "joint_nag"]

_INPUTS = ("encoder_hidden_states", "pooled_projections", "timestep")


def is_joint_attention(module: Any) -> bool:
    """A diffusers attention module over ``[image; text]`` tokens with its own text projections (MMDiT)."""
    return callable(getattr(module, "set_processor", None)) and getattr(module, "add_k_proj", None) is not None


def is_joint_transformer(module: Any) -> bool:
    """An SD3-style MMDiT transformer: joint-attention blocks, a text stream and a pooled time-text embedding."""
    if any(getattr(module, name, None) is None for name in ("transformer_blocks", "context_embedder",
                                                             "time_text_embed", "norm_out")):
        return False
    if getattr(module, "single_transformer_blocks", None) is not None:  # Flux: single-stream blocks too
        return False
    try:
        params = inspect.signature(type(module).forward).parameters  # the class's: attach patches the instance
    except (TypeError, ValueError):
        return False
    return all(name in params for name in _INPUTS) and any(
        is_joint_attention(getattr(b, "attn", None)) for b in module.transformer_blocks
    )


class _JointGuided:
    """The joint-attention processor: the call's rows with the original, the guided rows with both text streams."""

    def __init__(self, hook: Any, original: Any, rows: slice | None, guide: bool):
        self.hook, self.original, self.rows, self.guide = hook, original, rows, guide

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        n = hidden_states.shape[0]
        if encoder_hidden_states is None or encoder_hidden_states.shape[0] == n:  # no negative rows carried
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError("NAG on joint attention does not support an attention mask.")
        guided = torch.arange(n)[self.rows if self.rows is not None else slice(None)]
        k = len(guided)
        if encoder_hidden_states.shape[0] != n + k:
            raise RuntimeError(f"NAG: expected {n + k} text rows (the call's and the negative ones), "
                               f"got {encoder_hidden_states.shape[0]}.")
        outside = torch.ones(n, dtype=torch.bool)
        outside[guided] = False
        other = outside.nonzero().flatten()
        device = hidden_states.device
        both = torch.cat([guided, guided])
        text = torch.cat([encoder_hidden_states[guided.to(device)], encoder_hidden_states[n:]])
        with self._guided_projection(attn):
            image_g, text_g = self.original(
                attn, hidden_states[both.to(device)], text, None,
                *[batch_rows(a, both, n) for a in args], **{k_: batch_rows(v, both, n) for k_, v in kwargs.items()},
            )
        image = hidden_states.new_empty((n, *image_g.shape[1:])) if len(other) else image_g[:k]
        out_text = text_g.new_empty((n + k, *text_g.shape[1:]))
        out_text[n:] = text_g[k:]
        out_text[guided.to(device)] = text_g[:k]
        if len(other):
            image[guided.to(device)] = image_g[:k]
            image_o, text_o = self.original(
                attn, hidden_states[other.to(device)], encoder_hidden_states[other.to(device)], None,
                *[batch_rows(a, other, n) for a in args], **{k_: batch_rows(v, other, n) for k_, v in kwargs.items()},
            )
            image[other.to(device)] = image_o
            out_text[other.to(device)] = text_o
        return image, out_text

    @contextlib.contextmanager
    def _guided_projection(self, attn: Any) -> Iterator[None]:
        hook, calls = self.hook, []

        def guide(module: Any, inputs: tuple) -> tuple:
            calls.append(1)
            z_pos, z_neg = inputs[0].chunk(2)
            z = z_pos
            if self.guide:
                z = normalized_attention_guidance(
                    z_pos, z_neg, hook.scale, tau=hook.tau, alpha=hook.alpha, norm=hook.norm
                )
            return (torch.cat([z, z]), *inputs[1:])

        handle = attn.to_out[0].register_forward_pre_hook(guide)
        try:
            yield
        finally:
            handle.remove()
        if len(calls) != 1:
            raise RuntimeError(
                f"NAG: the processor {type(self.original).__name__} called its output projection `to_out[0]` "
                f"{len(calls)} times (expected once); NAG reads the image attention output there."
            )


def _truncate_condition(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Pre-hook of an adaptive norm of the image stream: the conditioning's first rows, one per image row."""
    if not args or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    if "emb" in kwargs and isinstance(kwargs["emb"], Tensor) and kwargs["emb"].shape[0] > x.shape[0]:
        return args, {**kwargs, "emb": kwargs["emb"][: x.shape[0]]}
    if len(args) > 1 and isinstance(args[1], Tensor) and args[1].shape[0] > x.shape[0]:
        return (args[0], args[1][: x.shape[0]], *args[2:]), kwargs
    return None


@contextlib.contextmanager
def joint_nag(
    hook: Any, module: Any, rows: slice | None, matcher: Callable[[str, Any], bool]
) -> Iterator[None]:
    """Install NAG on the SD3-style transformer ``module`` for ``rows`` (``None``: all); the layers ``matcher`` picks guide.

    ``hook`` carries ``scale``, ``tau``, ``alpha``, ``norm``, ``negative`` (``(1 or k, tokens,
    features)``) and ``negative_pooled`` (``(1 or k, features)`` or ``None``).
    """
    attentions = [(name, sub) for name, sub in module.named_modules() if is_joint_attention(sub)]
    originals = [(sub, sub.get_processor()) for _, sub in attentions]
    norms = [block.norm1 for block in module.transformer_blocks] + [module.norm_out]
    handles = []
    try:
        for (name, sub), (_, original) in zip(attentions, originals, strict=True):
            sub.set_processor(_JointGuided(hook, original, rows, bool(matcher(name, sub))))
        for norm in norms:
            handles.append(norm.register_forward_pre_hook(_truncate_condition, with_kwargs=True))
        text, time_text = _appenders(hook, rows)
        handles.append(module.context_embedder.register_forward_hook(text))
        handles.append(module.time_text_embed.register_forward_hook(time_text))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for sub, original in originals:
            sub.set_processor(original)


def _appenders(hook: Any, rows: slice | None) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """Forward hooks of ``context_embedder`` and ``time_text_embed`` appending the negative rows' outputs.

    Hooks on these sub-modules (not on the transformer's own call) also run when the transformer's
    ``forward`` is called directly, as ``attach`` does.
    """

    def text(module: Any, args: tuple, output: Tensor) -> Tensor:
        context = args[0]
        guided = torch.arange(context.shape[0])[rows if rows is not None else slice(None)]
        negative = hook.context_rows(len(guided), context)
        if negative.shape[1:] != context.shape[1:]:
            raise ValueError(
                f"The NAG negative context has shape {tuple(negative.shape[1:])} per row but the prompt's is "
                f"{tuple(context.shape[1:])}: on SD3 the negative text rows travel with the prompt's, so they "
                "need the same length (encode it with the pipeline's `max_sequence_length`)."
            )
        return torch.cat([output, module.forward(negative)])

    def time_text(module: Any, args: tuple, output: Tensor) -> Tensor:
        timestep, pooled = args[0], args[1]
        guided = torch.arange(pooled.shape[0])[rows if rows is not None else slice(None)]
        if timestep.ndim == 1 and timestep.shape[0] == pooled.shape[0]:
            timestep = timestep[guided.to(timestep.device)]
        return torch.cat([output, module.forward(timestep, hook.pooled_rows(guided, pooled))])

    return text, time_text
