"""Left padding of token-id lists (decoder-only models generate from the right edge) and the position ids of a mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import LongTensor

__all__ = ["left_pad", "position_ids"]


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[LongTensor, LongTensor]:
    """``(input_ids, attention_mask)`` of ``sequences`` left-padded to the longest with ``pad_token_id``.

    Args:
        sequences: one or more token-id lists (each may be empty; at least one list).
        pad_token_id (`int`): the id written into the padding (masked out by the mask).

    Example:
        >>> from guidance.lm.padding import left_pad
        >>> left_pad([[5, 6, 7], [8]], pad_token_id=0)
        (tensor([[5, 6, 7],
                [0, 0, 8]]), tensor([[1, 1, 1],
                [0, 0, 1]]))
    """
    if not sequences:
        raise ValueError("`sequences` must hold at least one token-id list.")
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, length - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, length - len(seq) :] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> LongTensor:
    """Each token's position among the unmasked tokens of its row (0 at masked places), as ``generate`` counts.

    The one rule of every adapter that runs a left-padded batch itself (two-branch CFG, the
    cached unconditional branch, GeDi's class LM), so that positions match plain ``generate``.

    Args:
        attention_mask (`torch.Tensor`): ``(B, T)`` of 0 (padding) and 1, integer or bool.

    Example:
        >>> import torch
        >>> from guidance.lm.padding import position_ids
        >>> position_ids(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
        tensor([[0, 0, 0, 1],
                [0, 1, 2, 3]])
    """
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
