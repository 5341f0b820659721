"""Building the one ``2B`` batch that carries the conditional and unconditional rows of CFG decoding.

Rows ``0..B-1`` are the prompts (conditional), rows ``B..2B-1`` the unconditional contexts
(the last prompt token by default, or a negative prompt). Both halves are left-padded to
one length, with an attention mask and position ids computed from that mask, so a row's
positions do not depend on how much padding it got.
"""

from __future__ import annotations

import torch
from torch import LongTensor, Tensor

from guidance.lm.padding import position_ids

__all__ = ["GuidedBatch", "build_guided_batch", "expand_negative_prompt"]


def expand_negative_prompt(
    negative_ids: Tensor,
    negative_mask: Tensor | None,
    batch_size: int,
    num_return_sequences: int,
) -> tuple[LongTensor, LongTensor]:
    """Broadcast negative prompts to the ``batch_size * num_return_sequences`` decoding rows.

    Accepts one negative prompt for all rows, one per prompt, or one per decoding row.
    """
    if negative_ids.ndim == 1:
        negative_ids = negative_ids.unsqueeze(0)
    if negative_ids.ndim != 2:
        raise ValueError(
            f"`negative_prompt_ids` must have shape (num_negative_prompts, length), got {tuple(negative_ids.shape)}."
        )
    if negative_ids.shape[1] == 0:
        raise ValueError("`negative_prompt_ids` is empty (length 0); pass at least one token or leave it out.")
    if negative_mask is None:
        negative_mask = torch.ones_like(negative_ids)
    elif negative_mask.ndim == 1:
        negative_mask = negative_mask.unsqueeze(0)
    if negative_mask.shape != negative_ids.shape:
        raise ValueError(
            "`negative_prompt_attention_mask` must have the shape of `negative_prompt_ids`, "
            f"got {tuple(negative_mask.shape)} and {tuple(negative_ids.shape)}."
        )
    if bool((negative_mask.sum(-1) == 0).any()):
        raise ValueError("A negative prompt is empty: its `negative_prompt_attention_mask` row is all zeros.")
    rows = batch_size * num_return_sequences
    count = negative_ids.shape[0]
    if count == 1:
        negative_ids, negative_mask = negative_ids.expand(rows, -1), negative_mask.expand(rows, -1)
    elif count == batch_size:
        negative_ids = negative_ids.repeat_interleave(num_return_sequences, dim=0)
        negative_mask = negative_mask.repeat_interleave(num_return_sequences, dim=0)
    elif count != rows:
        raise ValueError(
            f"`negative_prompt_ids` has {count} rows; it must have 1 (one negative prompt for all) or "
            f"{batch_size} (one per prompt)"
            + (f" or {rows} (one per returned sequence)" if rows != batch_size else "")
            + "."
        )
    return negative_ids.long(), negative_mask.long()


def _left_pad(ids: Tensor, mask: Tensor, length: int, pad_token_id: int) -> tuple[Tensor, Tensor]:
    missing = length - ids.shape[1]
    if missing == 0:
        return ids, mask
    pad_ids = torch.full((ids.shape[0], missing), pad_token_id, dtype=ids.dtype, device=ids.device)
    pad_mask = torch.zeros((mask.shape[0], missing), dtype=mask.dtype, device=mask.device)
    return torch.cat([pad_ids, ids], dim=1), torch.cat([pad_mask, mask], dim=1)


class GuidedBatch:
    """The doubled batch: ``input_ids``, ``attention_mask``, ``position_ids`` of shape ``(2B, T)``."""

    def __init__(self, input_ids: LongTensor, attention_mask: LongTensor, position_ids: LongTensor, rows: int):
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.position_ids = position_ids
        self.rows = rows


def build_guided_batch(
    input_ids: LongTensor,
    attention_mask: Tensor | None,
    unconditional_ids: LongTensor | None,
    unconditional_mask: Tensor | None,
    pad_token_id: int,
) -> GuidedBatch:
    """Stack prompts and unconditional contexts into one left-padded ``2B`` batch.

    ``unconditional_ids=None`` uses the last prompt token of each row, as Sanchez et al.
    and transformers do. Prompts must already be left-padded (decoder-only generation).
    """
    rows, length = input_ids.shape
    if length == 0:
        raise ValueError("`input_ids` is empty: CFG needs a prompt of at least one token per row.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(dtype=torch.long)
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("A prompt is empty: its `attention_mask` row is all zeros.")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            "Prompts must be left-padded for decoder-only generation (an `attention_mask` row ends in 0); "
            "set `tokenizer.padding_side = 'left'`."
        )
    if unconditional_ids is None:
        unconditional_ids = input_ids[:, -1:]
        unconditional_mask = torch.ones_like(unconditional_ids)
    assert unconditional_mask is not None
    unconditional_ids = unconditional_ids.to(input_ids.device)
    unconditional_mask = unconditional_mask.to(device=input_ids.device, dtype=torch.long)
    if bool((unconditional_mask[:, -1] == 0).any()):
        raise ValueError(
            "Negative prompts must be left-padded (a `negative_prompt_attention_mask` row ends in 0); "
            "tokenize them with `padding_side='left'`."
        )
    total = max(length, unconditional_ids.shape[1])
    cond_ids, cond_mask = _left_pad(input_ids, attention_mask, total, pad_token_id)
    uncond_ids, uncond_mask = _left_pad(unconditional_ids, unconditional_mask, total, pad_token_id)
    ids = torch.cat([cond_ids, uncond_ids], dim=0)
    mask = torch.cat([cond_mask, uncond_mask], dim=0)
    return GuidedBatch(ids, mask, position_ids(mask), rows)
