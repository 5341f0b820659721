"""S^2-Guidance: a random sub-network (randomly chosen blocks skipped) at every step."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from guidance.diffusion.perturbations._common import Layers
from guidance.diffusion.perturbations.skip_blocks import SkipBlocks, skipping
from guidance.validation import check_int, check_range

__all__ = ["StochasticSkip"]


class StochasticSkip(SkipBlocks):
    """Hook: every :meth:`apply` (every step) skips ``max(1, floor(ratio * n))`` of the ``n`` candidate blocks, drawn at random.

    Args:
        layers (str | Sequence[str] | Callable): the candidate blocks (e.g. ``"transformer_blocks.*"``
            with an ``fnmatch`` pattern, or a UNet's ``"attentions.0"`` layers).
        ratio (float): fraction of the candidates dropped, in (0, 1] (default 0.1).
        seed (int): seed of the hook's own generator (torch's global RNG is never used).

    Acts per row, like :class:`SkipBlocks`.

    Example:
        >>> import torch
        >>> from guidance.diffusion.perturbations import StochasticSkip
        >>> net = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(4)])
        >>> hook = StochasticSkip("[0-9]", ratio=0.5)
        >>> len(hook.draw(net))
        2
    """

    def __init__(self, layers: Layers, ratio: float = 0.1, seed: int = 0):
        super().__init__(layers)
        self.ratio = check_range(ratio, "ratio", 0.0, 1.0, lo_open=True)
        self.seed = check_int(seed, "seed", 0)
        self.generator = torch.Generator().manual_seed(self.seed)

    def draw(self, module: Any) -> list[tuple[str, Any]]:
        """The blocks skipped this time (advances the hook's generator)."""
        candidates = self.blocks(module)
        count = max(1, math.floor(self.ratio * len(candidates)))
        picked = torch.randperm(len(candidates), generator=self.generator)[:count].sort().values
        return [candidates[i] for i in picked.tolist()]

    def reset(self) -> None:
        """Restart the random sequence (start of a sampling run)."""
        self.generator.manual_seed(self.seed)

    @contextlib.contextmanager
    def apply(self, module: Any, rows: slice | None) -> Iterator[None]:
        with skipping(self.draw(module), rows):
            yield

    def __repr__(self) -> str:
        return f"StochasticSkip(layers={self.spec!r}, ratio={self.ratio}, seed={self.seed})"
