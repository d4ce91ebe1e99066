"""A small text-to-image DiT: text encoder, transformer with two repeated block types, decoder.

Shapes: latents (B, 4, H/4, W/4), patch 2, so the token sequence is (H/8)·(W/8) image tokens.
Attention goes through ``core.attention.attention`` with site names the USP adapter declares.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.attention import attention

LATENT_CHANNELS = 4
VAE_SCALE = 4
PATCH = 2


def timestep_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos(t·ω), sin(t·ω)], ω_j = 10000^(−j/half) (docs/models.md, timestep features)."""
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * omega[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding in real arithmetic; x (B, L, H, D), rope (L, D/2, 2)."""
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


class Rotary2D(nn.Module):
    """Per-token rotary table for an h×w grid: half the pairs encode rows, half columns."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        pairs = self.head_dim // 2
        per_axis = pairs // 2
        freqs = self.theta ** (-torch.arange(per_axis, dtype=torch.float64, device=tokens.device) / per_axis)
        rows = torch.arange(h, dtype=torch.float64, device=tokens.device)[:, None].expand(h, w).reshape(-1)
        cols = torch.arange(w, dtype=torch.float64, device=tokens.device)[None, :].expand(h, w).reshape(-1)
        angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)  # (L, pairs)
        return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, site: str, context_dim: int | None = None):
        super().__init__()
        self.heads, self.site = heads, site
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim or dim, dim)
        self.v = nn.Linear(context_dim or dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x, context=None, rope=None):
        ctx = x if context is None else context
        q = self.q(x).unflatten(-1, (self.heads, -1))
        k = self.k(ctx).unflatten(-1, (self.heads, -1))
        v = self.v(ctx).unflatten(-1, (self.heads, -1))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return self.o(attention(q, k, v, site=self.site).flatten(-2))


class JointBlock(nn.Module):
    """Self-attention over image tokens, cross-attention to text, MLP; adaLN modulation."""

    def __init__(self, dim: int, heads: int, text_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(dim, heads, "self")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, heads, "cross", context_dim=text_dim)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x, context, temb, rope):
        s1, c1, g1, s2, c2, g2 = self.modulation(F.silu(temb))[:, None].chunk(6, dim=-1)
        x = x + g1 * self.self_attn(self.norm1(x) * (1 + c1) + s1, rope=rope)
        x = x + self.cross_attn(self.norm2(x), context=context)
        return x + g2 * self.mlp(self.norm3(x) * (1 + c2) + s2)


class SingleBlock(nn.Module):
    """Self-attention and MLP in parallel branches (a second repeated block type)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, "self")
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.modulation = nn.Linear(dim, 3 * dim)

    def forward(self, x, temb, rope):
        shift, scale, gate = self.modulation(F.silu(temb))[:, None].chunk(3, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        return x + gate * (self.attn(h, rope=rope) + self.mlp(h))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, out)

    def forward(self, x, temb):
        shift, scale = self.modulation(F.silu(temb))[:, None].chunk(2, dim=-1)
        return self.proj(self.norm(x) * (1 + scale) + shift)


class ExampleDiT(nn.Module):
    """For USP: tokens split at the ``patch_embed`` output (dim 1) and the ``rope`` output (dim 0);
    gathered at the ``final`` output (dim 1), before unpatchify."""

    _repeated_blocks = ("JointBlock", "SingleBlock")

    def __init__(self, dim=64, heads=4, joint_layers=2, single_layers=2, text_dim=32):
        super().__init__()
        self.heads = heads
        patch_dim = LATENT_CHANNELS * PATCH * PATCH
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.time_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.rope = Rotary2D(dim // heads)
        self.joint_blocks = nn.ModuleList(JointBlock(dim, heads, text_dim) for _ in range(joint_layers))
        self.single_blocks = nn.ModuleList(SingleBlock(dim, heads) for _ in range(single_layers))
        self.final = FinalLayer(dim, patch_dim)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = latents.shape
        h, w = hh // PATCH, ww // PATCH
        patches = latents.reshape(b, c, h, PATCH, w, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * PATCH * PATCH)
        x = self.patch_embed(patches)
        rope = self.rope(x, h, w)
        temb = self.time_embed(timestep_features(timestep * 1000.0))
        for block in self.joint_blocks:
            x = block(x, context, temb, rope)
        for block in self.single_blocks:
            x = block(x, temb, rope)
        out = self.final(x, temb)
        return out.reshape(b, h, w, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)


class ByteTextEncoder(nn.Module):
    """UTF-8 bytes as tokens (no tokenizer files), padded to ``max_tokens``, one MLP layer."""

    def __init__(self, dim=32, max_tokens=64):
        super().__init__()
        self.max_tokens = max_tokens
        self.embed = nn.Embedding(257, dim)  # 256 bytes + padding id 256
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, text: str) -> torch.Tensor:
        ids = list(text.encode("utf-8"))
        return torch.tensor(ids + [256] * (self.max_tokens - len(ids)), dtype=torch.long)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.norm(x + self.mlp(x))


class TinyDecoder(nn.Module):
    """Latents (B, 4, h, w) to RGB (B, 3, 4h, 4w) in [0, 1]; the pipeline calls ``decode``."""

    def __init__(self, channels=16):
        super().__init__()
        self.conv_in = nn.Conv2d(LATENT_CHANNELS, channels, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(latents))
        x = F.silu(self.up1(x))
        x = F.silu(self.up2(x))
        return torch.sigmoid(self.conv_out(x))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)
