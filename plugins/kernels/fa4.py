"""FlashAttention-4 (``flash-attn-4``: ``flash_attn.cute.flash_attn_func``) as a ditkit attention kernel.

ditkit kernels take ``(batch, heads, tokens, head_dim)`` like SDPA; FlashAttention takes
``(batch, tokens, heads, head_dim)``. FA4 runs fp16/bf16 on CUDA without an arbitrary mask; any
other call (a boolean or additive mask such as USP's pad-key mask, float32, a CPU tensor) goes
to :func:`core.attention.sdpa`, so the kernel computes the same function everywhere it is used.
Whether FA4 is exact on a shape is measured, not assumed: ``scripts/attention_kernels.py``
compares it with SDPA math in float32 before timing it.
"""
from __future__ import annotations

import importlib.util

import torch

MODULE = "flash_attn.cute"


def available() -> bool:
    """``flash_attn.cute`` is installed (found without importing it: the CuTe DSL loads slowly)."""
    try:
        return importlib.util.find_spec(MODULE) is not None
    except (ImportError, ValueError):  # a ``flash_attn`` package without ``cute`` (FlashAttention 2)
        return False


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale=None) -> torch.Tensor:
    """FA4's ``flash_attn_func`` on ``(B, H, L, D)`` tensors (it takes and returns ``(B, L, H, D)``)."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    if isinstance(out, tuple):  # (out, lse)
        out = out[0]
    return out.transpose(1, 2)


def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask=None, scale=None) -> torch.Tensor:
    """``(B, H, L, D)`` in and out; FA4 where it applies, SDPA otherwise (see the module docstring)."""
    if mask is not None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        from core.attention import sdpa

        return sdpa(q, k, v, mask=mask, scale=scale)
    return flash(q, k, v, scale)
