"""SEG: self-attention queries blurred over the token grid (Smoothed Energy Guidance)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from guidance.diffusion.perturbations._common import Layers, is_self_attention, layer_matcher, select
from guidance.validation import check_range

__all__ = ["SmoothedQueries", "blur_queries", "INFINITE_BLUR"]

INFINITE_BLUR = 9999.0  # at or above this sigma every query becomes the mean query (the paper's limit)


def _kernel(sigma: float, side: int, dtype: torch.dtype, device: Any) -> Tensor:
    size = min(math.ceil(6 * sigma) + 1, side)
    size = size if size % 2 else size - 1
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur_queries(query: Tensor, sigma: float) -> Tensor:
    """Blur ``query`` (batch, tokens, channels) over its square token grid with a Gaussian of std ``sigma``.

    The first ``floor(sqrt(tokens))**2`` tokens form the grid (the others, e.g. extra tokens, are
    left as they are). ``sigma >= INFINITE_BLUR`` replaces each grid query by their mean. Reflect
    padding; kernel size ``ceil(6 sigma) + 1`` made odd and capped at the grid side.

    Example:
        >>> import torch
        >>> from guidance.diffusion.perturbations.smoothed_queries import blur_queries
        >>> q = torch.randn(1, 16, 3)
        >>> torch.allclose(blur_queries(q, 1e6), q.mean(1, keepdim=True).expand_as(q))
        True
    """
    sigma = check_range(sigma, "sigma", 0.0, math.inf, lo_open=True)
    batch, tokens, channels = query.shape
    side = math.isqrt(tokens)
    grid_tokens = side * side
    grid = query[:, :grid_tokens]
    if sigma >= INFINITE_BLUR:
        blurred = grid.mean(dim=1, keepdim=True).expand_as(grid)
    else:
        k = _kernel(sigma, side, query.dtype, query.device)
        if k.numel() == 1:
            return query
        image = grid.transpose(1, 2).reshape(batch * channels, 1, side, side)
        pad = k.numel() // 2
        image = F.conv2d(F.pad(image, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        image = F.conv2d(F.pad(image, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
        blurred = image.reshape(batch, channels, grid_tokens).transpose(1, 2)
    return torch.cat([blurred, query[:, grid_tokens:]], dim=1) if grid_tokens < tokens else blurred.contiguous()


class SmoothedQueries:
    """Hook: in the self-attention layers matched by ``layers``, blur the query projection's output (SEG).

    Args:
        layers (str | Sequence[str] | Callable): which layers (``"mid"`` in the SEG paper's SDXL setup).
        sigma (float): blur std in tokens, > 0; ``>= 9999`` is the infinite blur (default 9999,
            the mean query; the paper's recommended limit).

    Acts per row (a forward hook on ``to_q`` that changes only the branch's rows).

    Example:
        >>> from guidance.diffusion.perturbations import SmoothedQueries
        >>> SmoothedQueries("mid", sigma=3.0).per_row
        True
    """

    per_row = True

    def __init__(self, layers: Layers = "mid", sigma: float = INFINITE_BLUR):
        self.sigma = check_range(sigma, "sigma", 0.0, math.inf, lo_open=True)
        self.matcher, self.spec = layer_matcher(layers), layers

    @contextlib.contextmanager
    def apply(self, module: Any, rows: slice | None) -> Iterator[None]:
        chosen = select(module, lambda n, m: is_self_attention(m) and self.matcher(n, m))
        handles = []

        def hook(sub: Any, args: tuple, output: Tensor) -> Tensor:
            if rows is None:
                return blur_queries(output, self.sigma)
            out = output.clone()
            out[rows] = blur_queries(output[rows], self.sigma)
            return out

        try:
            for _, attention in chosen:
                handles.append(attention.to_q.register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def __repr__(self) -> str:
        return f"SmoothedQueries(layers={self.spec!r}, sigma={self.sigma})"
