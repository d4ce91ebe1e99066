"""Qwen-Image diffusion transformer (diffusers ``QwenImageTransformer2DModel``) in plain PyTorch.

``QwenImageTransformer(config).state_dict()`` is the published ``transformer/`` layout (1933
tensors at the released config), so the sharded safetensors load with
``load_state_dict(strict=True)`` and no key conversion.

Math (diffusers, the official release):

* packing: latent ``(B, 16, h, w)`` → tokens ``(B, (h/2)(w/2), 64)`` in raster order, feature
  index ``c·4 + p_h·2 + p_w`` (channel *slowest*, the opposite of Wan);
* text: ``txt_in(RMSNorm(prompt_embeds))``; time: 256 sinusoidal features of ``1000·σ``
  (``[cos, sin]``), computed in float32, then ``linear_1 → SiLU → linear_2``;
* each of the double-stream blocks modulates the image and text streams with their own
  ``(shift, scale, gate)`` pairs, projects q/k/v per stream, applies a **per-head** RMSNorm
  (weight of size head_dim) to q and k, rotates them with their rotary tables, and runs one
  joint attention over ``[text, image]``; the MLPs use GELU with the tanh approximation;
* output: ``norm_out`` (scale first, then shift) and ``proj_out``, unpacked back to latents.

Rotary embedding (diffusers ``QwenEmbedRope`` with ``scale_rope=True``), real-valued: head-dim
pairs ``(x_2j, x_2j+1)`` rotate by angle ``p·ω_j``, ``ω_j = 10000^(-2j/d_axis)`` per axis
(widths ``axes_dims_rope``: frame, row, column). Image token ``(i, j)`` of an ``h'×w'`` grid sits
at frame 0, row ``i − (h' − ⌊h'/2⌋)`` and column ``j − (w' − ⌊w'/2⌋)`` (centred); text token k
at ``P + k`` on all three axes with ``P = max(⌊h'/2⌋, ⌊w'/2⌋)``, on the diagonal just past the
image. Angles are float32 (diffusers builds its complex64 tables the same way); positions must
lie within ±4096, the range of the published tables.

Text is never padded inside this module: the pipeline runs each prompt with its real token count,
so no padded text key can act as a key and no mask is needed (the joint attention site takes
none under sequence parallelism).

Unified Sequence Parallelism (``core.spec``), sequence ``"image"``:

* split ``img_in`` output, dim 1 (the image tokens);
* split ``pos_embed`` output ``[0]`` (the image rotary table), dim 1, by the same ranges; the text
  table (``[1]``) and the text stream stay whole on every rank;
* attention site ``"joint"`` (strategy ``joint``): the call passes ``text_len=``;
* gather ``proj_out`` output, dim 1, before unpacking.

Nothing branches on tensor values; grid sizes and the text length come from shapes, so one
``torch.compile(dynamic=True)`` graph per block serves every resolution and prompt length.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.attention import attention

__all__ = [
    "QwenImageDiTConfig",
    "QwenImageTransformer",
    "QwenImageTransformerBlock",
    "QwenRotary",
    "apply_rope",
    "timestep_features",
    "pack_latents",
    "unpack_latents",
    "ROPE_POSITIONS",
]

ROPE_POSITIONS = 4096
"""Rotary positions must lie in ``[-4096, 4095]`` (the range of the published tables)."""


@dataclass(frozen=True)
class QwenImageDiTConfig:
    """Hyper-parameters; field names are the diffusers ``transformer/config.json`` keys and the
    defaults are the released model (60 layers, 24 heads × 128, 20.43 B parameters)."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"QwenImageDiTConfig: axes_dims_rope {self.axes_dims_rope} must be even and sum to "
                             f"attention_head_dim {self.attention_head_dim}")
        if self.in_channels != self.out_channels * self.patch_size ** 2:
            raise ValueError(f"QwenImageDiTConfig: in_channels {self.in_channels} != out_channels·patch² "
                             f"({self.out_channels}·{self.patch_size}²)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    # the USP adapter reads the head count by this name
    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    _UNSUPPORTED = {"guidance_embeds": False, "zero_cond_t": False, "use_additional_t_cond": False,
                    "use_layer3d_rope": False}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "QwenImageDiTConfig":
        """From a diffusers ``transformer/config.json``; refuses the edit/layered variants' flags."""
        for key, expected in cls._UNSUPPORTED.items():
            if data.get(key, expected) != expected:
                raise ValueError(f"transformer/config.json sets {key}={data[key]!r}: that Qwen-Image variant "
                                 f"(edit / layered) is not supported; expected {expected!r}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["axes_dims_rope"] = list(d["axes_dims_rope"])
        return d

    @classmethod
    def tiny(cls, **overrides: Any) -> "QwenImageDiTConfig":
        """CPU-sized: 2 layers, 4 heads × 16 (so Ulysses degree 4 divides the heads), text width 32."""
        return replace(cls(num_layers=2, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                           axes_dims_rope=(4, 6, 6)), **overrides)


# ---------------------------------------------------------------------------------------------
# Packing


def pack_latents(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``(B, C, h, w)`` → ``(B, (h/p)(w/p), C·p·p)``, raster order, channel slowest."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_latents(tokens: torch.Tensor, h: int, w: int, patch: int = 2) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``h × w``."""
    b = tokens.shape[0]
    c = tokens.shape[-1] // (patch * patch)
    x = tokens.reshape(b, h // patch, w // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------
# Embeddings


def timestep_features(sigma: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """``[cos(1000·σ·ω), sin(1000·σ·ω)]``, ``ω_j = exp(−ln(10⁴)·j/half)``, float32: diffusers
    ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)``, op for op."""
    half = dim // 2
    omega = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    angles = 1000.0 * (sigma.reshape(-1, 1).float() * omega[None, :])
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """``linear_1 → SiLU → linear_2`` (diffusers names)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class QwenTimestepProjEmbeddings(nn.Module):
    """σ → temb ``(B, D)``: features in float32, projected in the model dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        features = timestep_features(sigma)
        return self.timestep_embedder(features.to(self.timestep_embedder.linear_1.weight.dtype))


def _axis_omega(width: int, device) -> torch.Tensor:
    return 1.0 / torch.pow(10000.0, torch.arange(0, width, 2, device=device).to(torch.float32).div(width))


def _cos_sin(positions: torch.Tensor, width: int) -> torch.Tensor:
    """``(n,)`` integer positions → ``(n, width/2, 2)`` [cos, sin] of the float32 angles p·ω."""
    angles = positions.to(torch.float32)[:, None] * _axis_omega(width, positions.device)[None, :]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


class QwenRotary(nn.Module):
    """Rotary tables of the image grid and the text tokens; no parameters or buffers.

    ``forward(h, w, text_len, device)`` (``h × w`` token grid) returns ``(img, txt)``:
    ``(1, h·w, 1, head_dim/2, 2)`` and ``(1, text_len, 1, head_dim/2, 2)``, float32, cos in
    ``[..., 0]`` and sin in ``[..., 1]``, tokens on dim 1.
    """

    def __init__(self, axes_dims: tuple[int, int, int]):
        super().__init__()
        self.axes_dims = tuple(axes_dims)

    def forward(self, h: int, w: int, text_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        df, dh, dw = self.axes_dims
        frame = _cos_sin(torch.zeros(1, dtype=torch.long, device=device), df)
        rows = _cos_sin(torch.arange(h, device=device) - (h - h // 2), dh)
        cols = _cos_sin(torch.arange(w, device=device) - (w - w // 2), dw)
        img = torch.cat([
            frame[:, None].expand(h, w, df // 2, 2),
            rows[:, None].expand(h, w, dh // 2, 2),
            cols[None, :].expand(h, w, dw // 2, 2),
        ], dim=2).reshape(1, h * w, 1, (df + dh + dw) // 2, 2)
        start = max(h // 2, w // 2)
        pos = torch.arange(text_len, device=device) + start
        txt = torch.cat([_cos_sin(pos, d) for d in self.axes_dims], dim=1)
        return img, txt.reshape(1, text_len, 1, (df + dh + dw) // 2, 2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x: (B, L, H, d)``: out_2j = x_2j·cos − x_2j+1·sin,
    out_2j+1 = x_2j·sin + x_2j+1·cos, in float32, returned in x's dtype."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rope.unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """diffusers ``RMSNorm``: mean square in float32, eps 1e-6, learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            return h.to(self.weight.dtype) * self.weight
        return (h * self.weight).to(dtype)


class GELUProj(nn.Module):
    """``proj`` then GELU with the tanh approximation (diffusers ``gelu-approximate``; §E: not
    DiffSynth's sigmoid approximation)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``net.0`` (Linear + GELU-tanh), ``net.1`` (dropout, inactive), ``net.2`` (Linear)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class QwenJointAttention(nn.Module):
    """Per-stream q/k/v projections, per-head q/k RMSNorm, rotary, one joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])
        self.to_add_out = nn.Linear(inner, dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, img_rope: torch.Tensor,
                txt_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.head_dim
        q_i = apply_rope(self.norm_q(self.to_q(img).unflatten(-1, (-1, d))), img_rope)
        k_i = apply_rope(self.norm_k(self.to_k(img).unflatten(-1, (-1, d))), img_rope)
        v_i = self.to_v(img).unflatten(-1, (-1, d))
        q_t = apply_rope(self.norm_added_q(self.add_q_proj(txt).unflatten(-1, (-1, d))), txt_rope)
        k_t = apply_rope(self.norm_added_k(self.add_k_proj(txt).unflatten(-1, (-1, d))), txt_rope)
        v_t = self.add_v_proj(txt).unflatten(-1, (-1, d))
        text_len = txt.shape[1]
        out = attention(torch.cat([q_t, q_i], dim=1), torch.cat([k_t, k_i], dim=1), torch.cat([v_t, v_i], dim=1),
                        site="joint", scale=d ** -0.5, text_len=text_len).flatten(2)
        return self.to_out[0](out[:, text_len:]), self.to_add_out(out[:, :text_len])


def _modulate(x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shift, scale, gate = params[:, None].chunk(3, dim=-1)
    return x * (1 + scale) + shift, gate


class QwenImageTransformerBlock(nn.Module):
    """Double-stream block: image and text each modulated by their own ``*_mod``, one joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = QwenJointAttention(dim, heads, head_dim, eps)
        self.img_mlp = FeedForward(dim)
        self.txt_mlp = FeedForward(dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, img_rope: torch.Tensor,
                txt_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)
        img_in, img_gate1 = _modulate(self.img_norm1(img), img_mod1)
        txt_in, txt_gate1 = _modulate(self.txt_norm1(txt), txt_mod1)
        img_attn, txt_attn = self.attn(img_in, txt_in, img_rope, txt_rope)
        img = img + img_gate1 * img_attn
        txt = txt + txt_gate1 * txt_attn
        img_in, img_gate2 = _modulate(self.img_norm2(img), img_mod2)
        img = img + img_gate2 * self.img_mlp(img_in)
        txt_in, txt_gate2 = _modulate(self.txt_norm2(txt), txt_mod2)
        txt = txt + txt_gate2 * self.txt_mlp(txt_in)
        return img, txt


class AdaLayerNormContinuous(nn.Module):
    """``norm_out``: ``(scale, shift) = linear(SiLU(temb))`` (scale first), LayerNorm without affine."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale)[:, None] + shift[:, None]


# ---------------------------------------------------------------------------------------------
# Model


class QwenImageTransformer(nn.Module):
    """The Qwen-Image DiT; ``state_dict()`` keys and shapes equal the published ``transformer/``."""

    _repeated_blocks = ("QwenImageTransformerBlock",)

    def __init__(self, config: QwenImageDiTConfig):
        super().__init__()
        self.config = c = config
        dim = c.inner_dim
        self.pos_embed = QwenRotary(c.axes_dims_rope)
        self.time_text_embed = QwenTimestepProjEmbeddings(dim)
        self.txt_norm = RMSNorm(c.joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(c.in_channels, dim)
        self.txt_in = nn.Linear(c.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim) for _ in range(c.num_layers))
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = nn.Linear(dim, c.patch_size ** 2 * c.out_channels)

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Predict the flow velocity.

        * ``latents``: ``(B, 16, h, w)`` (VAE latents, h and w even);
        * ``sigma``: noise level σ ∈ [0, 1] (not 1000·σ), a tensor ``(B,)`` or ``(1,)``;
        * ``text``: prompt embeddings ``(B, L_text, joint_attention_dim)``, real tokens only.

        Returns ``(B, 16, h, w)`` in the model dtype.
        """
        p = self.config.patch_size
        h, w = latents.shape[-2:]
        dtype = self.img_in.weight.dtype
        img = self.img_in(pack_latents(latents.to(dtype), p))
        txt = self.txt_in(self.txt_norm(text.to(dtype)))
        temb = self.time_text_embed(sigma.to(dtype))
        img_rope, txt_rope = self.pos_embed(h // p, w // p, txt.shape[1], latents.device)
        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, img_rope, txt_rope)
        out = self.proj_out(self.norm_out(img, temb))
        return unpack_latents(out, h, w, p)
