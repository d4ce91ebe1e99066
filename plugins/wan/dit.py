"""Wan 2.1 / 2.2 diffusion transformer (the official ``WanModel``) in plain PyTorch.

``WanModel(config).state_dict()`` is the official checkpoint layout (docs/models.md, Wan DiT; key-set
fingerprints in Appendix B), so a published ``diffusion_pytorch_model*.safetensors`` loads with
``load_state_dict(strict=True)`` and no key conversion.  Semantics follow the official code:
3-D RoPE with interleaved pairs in real cos/sin form (tables built in float64, then cast), q/k
RMSNorm over the whole width, affine ``norm3`` before an ungated text cross-attention, and
LayerNorm, modulation, gated residuals and the head in float32.  Every attention
goes through :func:`core.attention.attention` (``site="self"`` and ``site="cross"``).

Tensor layout inside :meth:`WanModel.forward` (``L = f·h·w`` tokens in raster order, frames
slowest; ``Lt`` is 1 for a per-sample timestep ``t: (B,)`` and ``L`` for per-token timesteps
``t: (B, L)``, as TI2V-5B uses)::

    rope            = self.rope(x)                 (1, L, 1, head_dim/2, 2)  [..., 0]=cos, [..., 1]=sin
    tokens          = self.patch_embedding(x)      (B, L, D)
    features        = self.time_features(t)        (B, Lt, freq_dim)
    e               = self.time_embedding(...)     (B, Lt, D)        -> head
    e0              = self.time_projection(e)      (B, Lt, 6·D)      -> viewed (B, Lt, 6, D) for the blocks
    context         = self.text_embedding(ctx)     (B, 512, D)       never split
    tokens          = block(tokens, e0, context, rope)   for block in self.blocks
    out             = self.head(tokens, e)         (B, L, prod(patch)·out_dim), before unpatchify

Unified Sequence Parallelism (``core.spec``), all on sequence ``"tokens"``:

* split ``patch_embedding`` output, dim 1 (the token stream, ``SequenceSplit(module="patch_embedding", at="output", dim=1)``);
* split ``rope`` output, dim 1 (the rotary table follows its tokens);
* per-token timesteps only (TI2V-5B, whose pipeline always passes ``t`` as ``(B, L)``): split
  ``time_features`` output, dim 1; ``e`` and ``e0`` then follow.  With ``t: (B,)`` that dim has
  size 1 and broadcasts over tokens: do not split it;
* attention sites: ``"self"`` -> ``parallel``; ``"cross"`` -> ``local`` (text context whole);
* gather ``head`` output, dim 1; unpatchify runs on the full sequence.

Nothing branches on tensor values; grid sizes come from ``x.shape``, so one
``torch.compile(dynamic=True)`` graph serves every step and resolution.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.attention import attention

__all__ = [
    "WanDiTConfig",
    "WAN_DIT_CONFIGS",
    "WanModel",
    "WanAttentionBlock",
    "WanRotary",
    "WanTimestepFeatures",
    "rope_axis_dims",
    "sinusoidal_features",
    "apply_rope",
]


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class WanDiTConfig:
    """Hyper-parameters of one Wan DiT (the official ``config.json`` plus its fixed defaults).

    ``model_type`` is ``"t2v"``, ``"i2v"`` (``in_dim`` 36: noise 16 + mask 4 + image latents 16,
    no CLIP branch, as Wan2.2-I2V-A14B) or ``"ti2v"`` (Wan2.2-TI2V-5B, 48 channels).
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    model_type: str = "t2v"
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024
    """Official RoPE tables hold positions 0..1023 per axis; larger grids are out of spec."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.model_type not in ("t2v", "i2v", "ti2v"):
            raise ValueError(f"WanDiTConfig.model_type {self.model_type!r} is not one of 't2v', 'i2v', 'ti2v'")
        if self.dim % self.num_heads:
            raise ValueError(f"WanDiTConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        head_dim = self.dim // self.num_heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"WanDiTConfig: head_dim {head_dim} must be even and >= 6 for the 3-axis RoPE split")
        if len(self.patch_size) != 3:
            raise ValueError(f"WanDiTConfig.patch_size {self.patch_size} must have 3 entries (t, h, w)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any], **overrides: Any) -> "WanDiTConfig":
        """Build from an official ``config.json`` (unknown keys such as ``_class_name`` are ignored).

        ``patch_size``, ``text_dim``, ``qk_norm``, ``cross_attn_norm`` and ``window_size`` are not
        read from the file: the official class ignores them there and always uses its defaults.
        """
        fields = {"dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "model_type", "freq_dim", "text_len", "eps"}
        kwargs = {k: data[k] for k in fields if k in data}
        missing = {"dim", "ffn_dim", "num_heads", "num_layers"} - set(kwargs)
        if missing:
            raise ValueError(f"Wan DiT config.json lacks {sorted(missing)}")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def tiny(cls, model_type: str = "t2v", **overrides: Any) -> "WanDiTConfig":
        """CPU-sized config (dim 256, 2 heads of 128, 2 layers) with the channel counts of ``model_type``."""
        in_dim, out_dim = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48)}[model_type]
        base = cls(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=in_dim, out_dim=out_dim,
                   model_type=model_type, text_dim=32)
        return replace(base, **overrides)


_WAN14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

WAN_DIT_CONFIGS: dict[str, WanDiTConfig] = {
    "wan2.1-t2v-1.3b": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanDiTConfig(**_WAN14B),
    # Both Wan2.2-T2V-A14B experts (high_noise_model/, low_noise_model/) have this key set.
    "wan2.2-t2v-a14b": WanDiTConfig(**_WAN14B),
    "wan2.2-i2v-a14b": WanDiTConfig(**_WAN14B, in_dim=36, out_dim=16, model_type="i2v"),
    "wan2.2-ti2v-5b": WanDiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30,
                                   in_dim=48, out_dim=48, model_type="ti2v"),
}
"""Released configurations (docs/models.md, Wan DiT). Wan2.1 I2V/FLF2V (CLIP branch) is not implemented."""


# ---------------------------------------------------------------------------------------------
# Position and time features (no parameters)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Head-dim widths given to the frame, height and width axes: (d - 4⌊d/6⌋, 2⌊d/6⌋, 2⌊d/6⌋)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(n: int, width: int, theta: float, device: torch.device) -> torch.Tensor:
    """Angles p·ω_j for p = 0..n-1 and ω_j = θ^(-2j/width), in float64: (n, width/2)."""
    omega = 1.0 / torch.pow(theta, torch.arange(0, width, 2, dtype=torch.float64, device=device) / width)
    return torch.arange(n, dtype=torch.float64, device=device)[:, None] * omega[None, :]


class WanRotary(nn.Module):
    """3-D rotary table for the token grid of a latent; no parameters.

    ``forward(x)`` takes the DiT input ``(B, C, F, H, W)`` and returns ``(1, L, 1, head_dim/2, 2)``
    float32, cos in ``[..., 0]`` and sin in ``[..., 1]``, tokens on dim 1 (raster order). Angles are
    computed in float64 (they reach ~1023 rad) and cast once, as the official float64 tables.
    """

    def __init__(self, head_dim: int, patch_size: tuple[int, int, int], theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.patch_size = tuple(patch_size)
        self.theta = theta
        self.axis_dims = rope_axis_dims(head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        f, h, w = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        df, dh, dw = self.axis_dims
        # cos/sin per axis in float64 (small tables), then broadcast over the grid in float32.
        tf, th, tw = (
            torch.stack([a.cos(), a.sin()], dim=-1).float()
            for a in (_axis_angles(n, d, self.theta, x.device) for n, d in ((f, df), (h, dh), (w, dw)))
        )
        table = torch.cat([
            tf[:, None, None].expand(f, h, w, df // 2, 2),
            th[None, :, None].expand(f, h, w, dh // 2, 2),
            tw[None, None, :].expand(f, h, w, dw // 2, 2),
        ], dim=3)
        return table.reshape(1, f * h * w, 1, self.head_dim // 2, 2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x_2j, x_2j+1) of ``x: (B, L, H, d)`` by the angles of ``rope``.

    Real form of (x_2j + i·x_2j+1)·e^{iθ_j} (docs/models.md, rotary embeddings); computed in float32, returned in x's dtype.
    """
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rope.unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def sinusoidal_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t·ω), sin(t·ω)] with ω_j = 10000^(-j/half), computed in float64, returned float32."""
    half = dim // 2
    t = t.to(torch.float64)
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t[..., None] * omega
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


class WanTimestepFeatures(nn.Module):
    """Sinusoidal timestep features; no parameters.

    ``t: (B,)`` gives ``(B, 1, dim)`` (one timestep per sample, broadcast over tokens);
    ``t: (B, L)`` gives ``(B, L, dim)`` (per-token timesteps, TI2V-5B), tokens on dim 1.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 1:
            t = t[:, None]
        elif t.dim() != 2:
            raise ValueError(f"timesteps must be (batch,) or (batch, tokens), got shape {tuple(t.shape)}")
        return sinusoidal_features(t, self.dim)


# ---------------------------------------------------------------------------------------------
# Layers


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Run ``layer`` in its weight dtype (the official code's matmuls run under autocast)."""
    return layer(x.to(layer.weight.dtype))


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (official ``WanLayerNorm``), output in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class WanRMSNorm(nn.Module):
    """RMSNorm over the whole width: normalise in float32, cast back, then scale (official order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class WanSelfAttention(nn.Module):
    """Self-attention with q/k RMSNorm over the full width and 3-D RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.norm_q(_linear(self.q, x)))
        k = self._heads(self.norm_k(_linear(self.k, x)))
        v = self._heads(_linear(self.v, x))
        out = attention(apply_rope(q, rope), apply_rope(k, rope), v, site="self")
        return _linear(self.o, out.flatten(2))


class WanCrossAttention(WanSelfAttention):
    """Text cross-attention: queries from the tokens, keys/values from the whole context; no RoPE, no mask."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.norm_q(_linear(self.q, x)))
        k = self._heads(self.norm_k(_linear(self.k, context)))
        v = self._heads(_linear(self.v, context))
        out = attention(q, k, v, site="cross")
        return _linear(self.o, out.flatten(2))


class WanAttentionBlock(nn.Module):
    """One transformer block (official ``WanAttentionBlock``).

    ``forward(x, e0, context, rope)``:

    * ``x``: tokens ``(B, L, D)``; returned float32 ``(B, L, D)`` (the residual stream is float32);
    * ``e0``: time modulation ``(B, Lt, 6, D)`` (``Lt`` 1 or L), added to ``self.modulation``
      and read as shift, scale, gate (attention) then shift, scale, gate (FFN);
    * ``context``: embedded text ``(B, Lc, D)``, attended whole;
    * ``rope``: the rotary table ``(1, L, 1, head_dim/2, 2)`` of :class:`WanRotary`.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, num_heads, eps)
        self.norm2 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        mod = self.modulation.float().unsqueeze(0) + e0.float()
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(2)
        x = x.float()
        y = self.self_attn(self.norm1(x) * (1 + scale_msa) + shift_msa, rope)
        x = x + y.float() * gate_msa
        x = x + self.cross_attn(self.norm3(x), context).float()
        ffn_in = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        y = self.ffn(ffn_in.to(self.ffn[0].weight.dtype))
        return x + y.float() * gate_mlp


class WanHead(nn.Module):
    """Output head: ``forward(x: (B, L, D), e: (B, Lt, D)) -> (B, L, prod(patch)·out_dim)``, float32.

    Modulated by the time embedding ``e`` itself (not ``e0``): shift, scale = ``modulation + e``.
    """

    def __init__(self, dim: int, out_features: int, eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float().unsqueeze(0) + e.float().unsqueeze(2)).unbind(2)
        return _linear(self.head, self.norm(x) * (1 + scale) + shift).float()


class WanPatchEmbedding(nn.Conv3d):
    """Conv3d with kernel = stride = patch, returning tokens ``(B, L, D)`` in raster order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A fresh (non-view) tensor: the blocks' compiled forward guards on whether its input is a
        # view, and every later block gets the previous block's fresh output, so a view here
        # would recompile the shared graph at the second block.
        return super().forward(x.to(self.weight.dtype)).flatten(2).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Model


class WanModel(nn.Module):
    """The Wan DiT; ``state_dict()`` keys and shapes equal the official checkpoint's."""

    _repeated_blocks = ("WanAttentionBlock",)

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embedding = WanPatchEmbedding(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.rope = WanRotary(c.head_dim, c.patch_size, c.rope_theta)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim))
        self.time_features = WanTimestepFeatures(c.freq_dim)
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(c.dim, c.ffn_dim, c.num_heads, c.eps) for _ in range(c.num_layers))
        self.head = WanHead(c.dim, math.prod(c.patch_size) * c.out_dim, c.eps)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        * ``x``: noisy latent ``(B, C, F, H, W)``; F, H, W multiples of the patch size.
        * ``t``: timesteps (1000·σ) as a tensor, ``(B,)``, or ``(B, L)`` per token (TI2V-5B).
        * ``context``: umT5 output ``(B, 512, text_dim)``, zero rows after each prompt's length
          (they are embedded and attended, never masked: official behaviour).
        * ``y``: image conditioning concatenated to ``x`` on channels (I2V: mask 4 + latents 16).

        Returns ``(B, out_dim, F, H, W)`` float32.
        """
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        pt, ph, pw = self.config.patch_size
        f, h, w = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw

        rope = self.rope(x)
        tokens = self.patch_embedding(x)
        features = self.time_features(t)
        e = self.time_embedding(features.to(self.time_embedding[0].weight.dtype)).float()
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float().unflatten(-1, (6, -1))
        ctx = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

        for block in self.blocks:
            tokens = block(tokens, e0, ctx, rope)
        out = self.head(tokens, e)
        return self.unpatchify(out, f, h, w)

    def unpatchify(self, out: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        """``(B, f·h·w, pt·ph·pw·C) -> (B, C, f·pt, h·ph, w·pw)``; token features have channel fastest."""
        pt, ph, pw = self.config.patch_size
        out = out.reshape(out.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(out.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)
