"""Our own attention processor for diffusers' FluxAttention: diffusers' projections, norms and
rotary embedding, with the attention itself through ditkit (``core.attention.attention``), so
ditkit's USP router sees it. Text comes first in the joint ``[text, image]`` sequence."""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from core.attention import attention


class DitkitFluxAttnProcessor:
    """Double-stream blocks pass the text as ``encoder_hidden_states``; single-stream blocks pass
    ``[text, image]`` joined, and the pipeline hands them the text length through
    ``joint_attention_kwargs={"text_len": ...}``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, text_len=None):
        heads = (-1, attn.head_dim)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, heads))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, heads))
        value = attn.to_v(hidden_states).unflatten(-1, heads)
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            query = torch.cat([attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, heads)), query], 1)
            key = torch.cat([attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, heads)), key], 1)
            value = torch.cat([attn.add_v_proj(encoder_hidden_states).unflatten(-1, heads), value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = attention(query, key, value, site="joint", mask=attention_mask, text_len=text_len)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text, image = out[:, :text_len], out[:, text_len:]
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())
