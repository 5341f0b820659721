"""PAG / STG-A: self-attention whose attention map is the identity (each token keeps its own value)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from guidance.diffusion.hooks import AttentionProcessors
from guidance.diffusion.perturbations._common import Layers, RowProcessor, is_self_attention, layer_matcher

__all__ = ["IdentityAttention", "identity_attention"]


def identity_attention(
    attn: Any,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor | None = None,
    attention_mask: Tensor | None = None,
    temb: Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """A diffusers attention processor with the attention map replaced by the identity.

    Self-attention: ``out = to_out(to_v(x))`` with the module's own normalisation, residual and
    output rescale. Joint text+image attention (SD3: ``encoder_hidden_states`` and ``add_q_proj``):
    image queries attend only to themselves among the image tokens and to every text token,
    text tokens attend as usual (the masking of diffusers' SD3 PAG pipeline).
    """
    if encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None:
        return _joint_identity(attn, hidden_states, encoder_hidden_states)
    residual = hidden_states
    if getattr(attn, "spatial_norm", None) is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    ndim = hidden_states.ndim
    if ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    out = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
    if ndim == 4:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _heads(x: Tensor, attn: Any, head_dim: int, norm: Any = None) -> Tensor:
    x = x.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
    return x if norm is None else norm(x)


def _joint_identity(attn: Any, hidden_states: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
    batch, tokens = hidden_states.shape[:2]
    head_dim = attn.to_k.out_features // attn.heads
    query = torch.cat([_heads(attn.to_q(hidden_states), attn, head_dim, attn.norm_q),
                       _heads(attn.add_q_proj(context), attn, head_dim, attn.norm_added_q)], dim=2)
    key = torch.cat([_heads(attn.to_k(hidden_states), attn, head_dim, attn.norm_k),
                     _heads(attn.add_k_proj(context), attn, head_dim, attn.norm_added_k)], dim=2)
    value = torch.cat([_heads(attn.to_v(hidden_states), attn, head_dim),
                       _heads(attn.add_v_proj(context), attn, head_dim)], dim=2)
    total = query.shape[2]
    mask = torch.zeros(total, total, dtype=query.dtype, device=query.device)
    image = torch.eye(tokens, dtype=torch.bool, device=query.device)
    mask[:tokens, :tokens] = torch.zeros_like(image, dtype=query.dtype).masked_fill(~image, float("-inf"))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    hidden, ctx = out[:, :tokens], out[:, tokens:]
    if not attn.context_pre_only:
        ctx = attn.to_add_out(ctx)
    return attn.to_out[1](attn.to_out[0](hidden)), ctx


class IdentityAttention(AttentionProcessors):
    """Hook: the self-attention layers matched by ``layers`` use the identity attention map (PAG, STG-A).

    Args:
        layers (str | Sequence[str] | Callable): which layers (see
            :func:`~guidance.diffusion.perturbations.layer_matcher`); only self-attention modules
            among the matches are changed. ``"mid"`` is PAG's default for SD/SDXL UNets,
            ``"transformer_blocks.1"`` for SD3 (``"blocks.1"`` also works).

    Acts per row (``per_row=True``): the perturbed branch shares one denoiser call with ``cond``
    and ``uncond``; the other rows run the layer's own processor.

    Example:
        >>> from guidance.diffusion.perturbations import IdentityAttention
        >>> IdentityAttention("mid").per_row
        True
    """

    def __init__(self, layers: Layers = "mid"):
        matcher = layer_matcher(layers)
        super().__init__(self._make, lambda name, m: is_self_attention(m) and matcher(name, m), per_row=True)
        self.spec = layers

    @staticmethod
    def _make(name: str, original: Any, rows: slice | None) -> RowProcessor:
        return RowProcessor(original, identity_attention, rows)

    def __repr__(self) -> str:
        return f"IdentityAttention(layers={self.spec!r})"
