"""SLG / STG-R: whole blocks skipped (each returns its input) in the perturbed branch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from guidance.diffusion.perturbations._common import Layers, layer_matcher, select

__all__ = ["SkipBlocks", "skipped_output"]


def skipped_output(output: Any, args: tuple, kwargs: dict, rows: slice | None) -> Any:
    """The output of a skipped block: its input hidden states (on ``rows``; elsewhere the real output).

    A block returning a tensor gets ``hidden_states`` back. A block returning a pair (SD3/Flux
    dual-stream blocks return ``(encoder_hidden_states, hidden_states)``) gets both inputs back.
    A block returning an output object (``.sample``) gets it with ``sample`` replaced.
    """
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if isinstance(output, Tensor):
        return _rows(output, hidden, rows)
    if isinstance(output, tuple) and len(output) == 2:
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        first = output[0] if output[0] is None or context is None else _rows(output[0], context, rows)
        return (first, _rows(output[1], hidden, rows))
    if isinstance(output, tuple) and len(output) == 1:
        return (_rows(output[0], hidden, rows),)
    if hasattr(output, "sample"):
        output.sample = _rows(output.sample, hidden, rows)
        return output
    raise TypeError(f"Cannot skip a block whose output is {type(output).__name__}.")


def _rows(output: Tensor, given: Tensor, rows: slice | None) -> Tensor:
    if given is None or given.shape != output.shape:
        raise ValueError(
            f"A skipped block must map hidden states to hidden states of the same shape; got input "
            f"{None if given is None else tuple(given.shape)} and output {tuple(output.shape)}."
        )
    if rows is None:
        return given
    out = output.clone()
    out[rows] = given[rows]
    return out


class SkipBlocks:
    """Hook: the blocks matched by ``layers`` return their inputs (Skip-Layer Guidance, STG-R).

    Args:
        layers (str | Sequence[str] | Callable): which sub-modules (see
            :func:`~guidance.diffusion.perturbations.layer_matcher`), e.g. ``"transformer_blocks.7"``
            or ``["transformer_blocks.7", "transformer_blocks.8"]`` (SD3.5: blocks 7, 8, 9),
            ``"mid_block.attentions.0.transformer_blocks.0"`` (a UNet's mid transformer block),
            ``"down_blocks.2.attentions.0"`` (an attention layer of the digits UNet). Only the
            outermost matches are hooked (a match inside another is already skipped).

    Acts per row: the skipped rows share one call with the others (the block still runs on all
    rows; the perturbed rows get their input back).

    Example:
        >>> import torch
        >>> from guidance.diffusion.perturbations import SkipBlocks
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> x = torch.ones(2, 2)
        >>> with SkipBlocks("0").apply(net, slice(1, 2)):
        ...     out = net(x)
        >>> torch.equal(out[1], x[1]), torch.equal(out[0], net(x)[0])
        (True, True)
    """

    per_row = True

    def __init__(self, layers: Layers):
        self.matcher, self.spec = layer_matcher(layers), layers

    def blocks(self, module: Any) -> list[tuple[str, Any]]:
        """The outermost sub-modules of ``module`` that this hook skips."""
        chosen = select(module, self.matcher)
        return [(n, m) for n, m in chosen if not any(n.startswith(o + ".") for o, _ in chosen if o != n)]

    @contextlib.contextmanager
    def apply(self, module: Any, rows: slice | None) -> Iterator[None]:
        with skipping(self.blocks(module), rows):
            yield

    def __repr__(self) -> str:
        return f"SkipBlocks(layers={self.spec!r})"


@contextlib.contextmanager
def skipping(blocks: list[tuple[str, Any]], rows: slice | None) -> Iterator[None]:
    """Forward hooks making ``blocks`` return their inputs on ``rows`` while the context is open."""
    handles = []

    def hook(sub: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        return skipped_output(output, args, kwargs, rows)

    try:
        for _, block in blocks:
            handles.append(block.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
