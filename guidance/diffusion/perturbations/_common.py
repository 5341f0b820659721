"""Shared pieces of the perturbation hooks: layer selection and per-row processors."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from guidance.diffusion.hooks import select_modules

Layers = str | Sequence[str] | Callable[[str, Any], bool]


def _component_match(spec: str, name: str) -> bool:
    spec_parts, name_parts = spec.split("."), name.split(".")
    for start in range(len(name_parts) - len(spec_parts) + 1):
        window = name_parts[start : start + len(spec_parts)]
        if all(s == n if s.isdigit() else s in n for s, n in zip(spec_parts, window, strict=True)):
            return True
    return False


def layer_matcher(layers: Layers) -> Callable[[str, Any], bool]:
    """A predicate ``(name, module) -> bool`` from layer specs.

    A spec with ``*?[`` is an ``fnmatch`` pattern over the full module name. Any other spec is a
    run of dotted components that must appear in the name, a text component matching any name
    component that contains it and a number matching only that number: ``"mid"`` matches
    ``mid_block.attentions.0...``, ``"blocks.1"`` matches ``transformer_blocks.1`` but not
    ``transformer_blocks.10``.
    """
    if callable(layers):
        return layers
    specs = (layers,) if isinstance(layers, str) else tuple(layers)
    if not specs or not all(isinstance(s, str) and s for s in specs):
        raise TypeError(f"`layers` must be non-empty strings, a list of them, or a predicate, got {layers!r}.")

    def matches(name: str, module: Any) -> bool:
        return any(
            fnmatch.fnmatchcase(name, s) if any(c in s for c in "*?[") else _component_match(s, name)
            for s in specs
        )

    return matches


def is_self_attention(module: Any) -> bool:
    """A diffusers attention module that attends over its own tokens (also joint text+image attention)."""
    return (
        callable(getattr(module, "set_processor", None))
        and hasattr(module, "to_v")
        and not getattr(module, "is_cross_attention", False)
    )


def select(module: Any, layers: Layers, kind: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """The ``(name, module)`` pairs matched by ``layers`` (``ValueError`` naming candidates when none)."""
    return select_modules(module, layer_matcher(layers), kind=kind)


def batch_rows(value: Any, index: Tensor, n: int) -> Any:
    """``value[index]`` for a tensor whose first dimension is the call's batch ``n``; anything else unchanged."""
    if isinstance(value, Tensor) and value.ndim and value.shape[0] == n:
        return value[index.to(value.device)]
    return value


def put_rows(out: Any, part: Any, index: Tensor) -> Any:
    """Write ``part`` into rows ``index`` of ``out`` (tensors or tuples of tensors / ``None``)."""
    if isinstance(out, tuple):
        return tuple(put_rows(o, p, index) for o, p in zip(out, part, strict=True))
    if out is None:
        return None
    out[index.to(out.device)] = part
    return out


class RowProcessor:
    """An attention processor that runs ``perturbed`` on ``rows`` of the batch and ``original`` on the rest.

    ``perturbed(attn, hidden_states, *args, **kwargs)`` has a processor's signature; ``rows``
    ``None`` means the whole batch.
    """

    def __init__(self, original: Any, perturbed: Callable[..., Any], rows: slice | None):
        self.original, self.perturbed, self.rows = original, perturbed, rows

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        # Named parameters: diffusers' Attention passes only the keywords a processor declares.
        named = {"encoder_hidden_states": encoder_hidden_states, "attention_mask": attention_mask, "temb": temb}
        kwargs = {**{k: v for k, v in named.items() if v is not None}, **kwargs}
        if self.rows is None:
            return self.perturbed(attn, hidden_states, *args, **kwargs)
        n = hidden_states.shape[0]
        inside = torch.zeros(n, dtype=torch.bool)
        inside[self.rows] = True
        parts = []
        for fn, index in ((self.original, (~inside).nonzero().flatten()), (self.perturbed, inside.nonzero().flatten())):
            if len(index):
                sub_args = [batch_rows(a, index, n) for a in args]
                sub_kwargs = {k: batch_rows(v, index, n) for k, v in kwargs.items()}
                parts.append((index, fn(attn, hidden_states[index.to(hidden_states.device)], *sub_args, **sub_kwargs)))
        if len(parts) == 1:
            return parts[0][1]
        (i0, a), (i1, b) = parts
        out = _empty_like_rows(a, n)
        return put_rows(put_rows(out, a, i0), b, i1)


def _empty_like_rows(part: Any, n: int) -> Any:
    if isinstance(part, tuple):
        return tuple(_empty_like_rows(p, n) for p in part)
    if part is None:
        return None
    return part.new_empty((n, *part.shape[1:]))
