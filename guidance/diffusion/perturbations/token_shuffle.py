"""TPG: the tokens entering chosen blocks are shuffled (Token Perturbation Guidance)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from guidance.diffusion.perturbations._common import Layers, layer_matcher, select
from guidance.validation import check_int

__all__ = ["ShuffleTokens"]


class ShuffleTokens:
    """Hook: the hidden states entering the blocks matched by ``layers`` get their tokens permuted (TPG).

    One new random permutation per block call, shared by the branch's rows, not undone after the
    block. Tokens are dimension 1 of ``(batch, tokens, channels)`` inputs, or the flattened
    spatial positions of ``(batch, channels, height, width)`` inputs. The permutations come from
    the hook's own generator (seeded by ``seed``, reseeded every :meth:`apply`, i.e. every step),
    never from torch's global RNG.

    Args:
        layers (str | Sequence[str] | Callable): which blocks (TPG's SDXL default: the down
            blocks' transformer blocks).
        seed (int): seed of the permutations (>= 0).

    Example:
        >>> import torch
        >>> from guidance.diffusion.perturbations import ShuffleTokens
        >>> net = torch.nn.Sequential(torch.nn.Identity())
        >>> x = torch.arange(6.0).reshape(1, 3, 2)
        >>> with ShuffleTokens("0").apply(net, None):
        ...     y = net(x)
        >>> sorted(y[0, :, 0].tolist())
        [0.0, 2.0, 4.0]
    """

    per_row = True

    def __init__(self, layers: Layers, seed: int = 0):
        self.seed = check_int(seed, "seed", 0)
        self.matcher, self.spec = layer_matcher(layers), layers
        self.calls = 0

    def reset(self) -> None:
        """Restart the permutation sequence (start of a sampling run)."""
        self.calls = 0

    def blocks(self, module: Any) -> list[tuple[str, Any]]:
        """The outermost matched sub-modules (a match inside another match is not hooked twice)."""
        chosen = select(module, self.matcher)
        return [(n, m) for n, m in chosen if not any(n.startswith(o + ".") for o, _ in chosen if o != n)]

    @contextlib.contextmanager
    def apply(self, module: Any, rows: slice | None) -> Iterator[None]:
        generator = torch.Generator().manual_seed(self.seed + self.calls)
        self.calls += 1
        handles = []

        def pre_hook(sub: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if "hidden_states" in kwargs:
                kwargs = {**kwargs, "hidden_states": _shuffle(kwargs["hidden_states"], rows, generator)}
            elif args:
                args = (_shuffle(args[0], rows, generator), *args[1:])
            return args, kwargs

        try:
            for _, block in self.blocks(module):
                handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def __repr__(self) -> str:
        return f"ShuffleTokens(layers={self.spec!r}, seed={self.seed})"


def _shuffle(hidden: Tensor, rows: slice | None, generator: torch.Generator) -> Tensor:
    if hidden.ndim == 4:
        b, c, h, w = hidden.shape
        flat = hidden.reshape(b, c, h * w).transpose(1, 2)
        return _shuffle(flat, rows, generator).transpose(1, 2).reshape(b, c, h, w)
    perm = torch.randperm(hidden.shape[1], generator=generator).to(hidden.device)
    if rows is None:
        return hidden[:, perm]
    out = hidden.clone()
    out[rows] = hidden[rows][:, perm]
    return out
