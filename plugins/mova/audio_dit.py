"""MOVA's audio tower (``audio_dit/``, the official ``WanAudioModel``) built from Wan's blocks.

A Wan 1.3B-shaped DiT over audio latents: one token per latent frame (20 ms at 48 kHz with hop
960), so the patch embedding is a ``Conv1d(128 → D, kernel 1)``; rotary positions are 1-D
(positions 0..L−1 over the *whole* head dim, interleaved pairs, ω_j = 10000^(−2j/d), table of
16384 positions); the head maps back to 128 channels.  Blocks, text cross-attention, time
embedding and head are :mod:`plugins.wan.dit`'s own classes (the block through a subclass with
its own ``forward`` code, so its compiled graph stays apart from the wider video blocks'), so
``state_dict()`` is the published key set (825 tensors for the release config).

The release ``config.json`` says ``vae_type: "dac"``; the official class defaults to
``"oobleck"`` (a legacy table that rotates only part of the head dim). Only ``"dac"`` is
implemented; another value is an error naming it.

Unified Sequence Parallelism, sequence ``"tokens"``: split ``patch_embedding`` and ``rope``
outputs on dim 1, sites ``"self"`` parallel and ``"cross"`` local, gather ``head`` output on dim 1
(the same points as the Wan DiT).  The audio length (253 or 403 latent frames at the official
settings) never divides the degree; the core pads and masks it exactly.

Dual-tower use (:mod:`plugins.mova.model`): ``forward(x, t, context, partner=fn)`` embeds the
audio, then hands the open audio stream to ``fn(run_block, stream)`` instead of running its own
blocks; ``fn`` runs the video tower and calls ``run_block(i, stream)`` between the video layers.
``run_block`` re-enters this module (``self(stream, layer=i)``), so every audio block runs inside
this component's own call: under USP its hooks and attention routing stay active while the video
tower and the bridge run theirs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from plugins.wan.dit import WanAttentionBlock, WanHead, WanTimestepFeatures

__all__ = ["AudioDiTConfig", "AUDIO_DIT_RELEASE", "WanAudioModel", "WanAudioBlock", "AudioRotary", "AudioStream"]


@dataclass(frozen=True)
class AudioDiTConfig:
    """Hyper-parameters of the audio tower (``audio_dit/config.json``)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 128
    out_dim: int = 128
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    vae_type: str = "dac"
    rope_theta: float = 10000.0
    rope_max_positions: int = 16384
    """The official table holds 16384 positions (about 5.5 minutes of audio at 50 latent frames/s)."""

    def __post_init__(self) -> None:
        if self.vae_type != "dac":
            raise ValueError(
                f"AudioDiTConfig.vae_type {self.vae_type!r}: only 'dac' (the released MOVA audio tower) is "
                f"implemented; the 'oobleck' rotary table of the official class default is not"
            )
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"AudioDiTConfig: dim {self.dim} / num_heads {self.num_heads} must be an even head dim")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "AudioDiTConfig":
        """From the official ``config.json`` (``_class_name`` and unused switches such as
        ``has_image_input`` are ignored; ``vae_type`` defaults to the class default ``"oobleck"``)."""
        keys = {"dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "eps"}
        missing = {"dim", "ffn_dim", "num_heads", "num_layers"} - set(data)
        if missing:
            raise ValueError(f"audio_dit config.json lacks {sorted(missing)}")
        return cls(**{k: data[k] for k in keys if k in data}, vae_type=data.get("vae_type", "oobleck"))

    def to_json_dict(self) -> dict[str, Any]:
        """The official ``config.json`` fields (what :func:`from_json_dict` reads back)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("rope_theta", "rope_max_positions")}
        return {"_class_name": "WanAudioModel", **d, "patch_size": [1], "has_image_input": False}

    @classmethod
    def tiny(cls, **overrides: Any) -> "AudioDiTConfig":
        """CPU-sized: dim 64 (4 heads of 16), 2 layers, 128-channel latents as released."""
        return replace(cls(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32), **overrides)


AUDIO_DIT_RELEASE = AudioDiTConfig()
"""The released ``audio_dit`` (1.419 B parameters, 825 tensors)."""


class AudioRotary(nn.Module):
    """1-D rotary table over the whole head dim; no parameters.

    ``forward(x)`` takes the latent ``(B, C, L)`` and returns ``(1, L, 1, head_dim/2, 2)`` float32
    (cos, sin), the layout :func:`plugins.wan.dit.apply_rope` reads.  Angles in float64, then cast
    (the official table is float64 complex).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        omega = 1.0 / torch.pow(self.theta, torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=x.device) / self.head_dim)
        angles = torch.arange(n, dtype=torch.float64, device=x.device)[:, None] * omega[None]
        return torch.stack([angles.cos(), angles.sin()], dim=-1).float()[None, :, None]


class AudioPatchEmbedding(nn.Conv1d):
    """``Conv1d(in_dim → D, kernel 1)``: each latent frame is one token; returns ``(B, L, D)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).transpose(1, 2)


@dataclass
class AudioStream:
    """The audio tower's state between its layers (tokens change; the rest is fixed per step)."""

    tokens: torch.Tensor
    e0: torch.Tensor
    context: torch.Tensor
    rope: torch.Tensor
    length: int
    """The full audio length in tokens (every rank sees the same value under USP)."""


class WanAudioBlock(WanAttentionBlock):
    """Wan's block (same modules, keys and math) as its own class with its own ``forward`` code:
    the compile engine keeps one graph per block class, and the audio blocks' widths differ from
    the video towers', so sharing :class:`WanAttentionBlock`'s graph would mean a recompile."""

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return super().forward(x, e0, context, rope)


class WanAudioModel(nn.Module):
    """The MOVA audio DiT; ``state_dict()`` equals the published ``audio_dit`` keys and shapes."""

    _repeated_blocks = ("WanAudioBlock",)

    def __init__(self, config: AudioDiTConfig):
        super().__init__()
        self.config = c = config
        self.patch_embedding = AudioPatchEmbedding(c.in_dim, c.dim, kernel_size=1)
        self.rope = AudioRotary(c.head_dim, c.rope_theta)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim))
        self.time_features = WanTimestepFeatures(c.freq_dim)
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(WanAudioBlock(c.dim, c.ffn_dim, c.num_heads, c.eps) for _ in range(c.num_layers))
        self.head = WanHead(c.dim, c.out_dim, c.eps)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def forward(
        self,
        x: torch.Tensor | AudioStream,
        t: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        *,
        partner: Callable[[Callable[[int, AudioStream], None], AudioStream], None] | None = None,
        layer: int | None = None,
    ) -> torch.Tensor | None:
        """Predict the audio velocity.

        * ``x``: audio latent ``(B, 128, L)``; ``t``: ``(B,)`` timesteps (1000·σ); ``context``:
          umT5 output ``(B, 512, text_dim)`` (the same context the video towers get).
        * ``partner``: run ``partner(run_block, stream)`` in place of the block loop (the dual-tower
          pass; ``run_block(i, stream)`` advances ``stream.tokens`` through block ``i``).
        * ``layer``: internal re-entrant form ``self(stream, layer=i)`` used by ``run_block``.

        Returns ``(B, 128, L)`` float32 (``None`` for the ``layer`` form).
        """
        if layer is not None:
            stream = x
            stream.tokens = self.blocks[layer](stream.tokens, stream.e0, stream.context, stream.rope)
            return None
        length = x.shape[-1]
        rope = self.rope(x)
        tokens = self.patch_embedding(x)
        features = self.time_features(t)
        e = self.time_embedding(features.to(self.time_embedding[0].weight.dtype)).float()
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float().unflatten(-1, (6, -1))
        ctx = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        stream = AudioStream(tokens, e0, ctx, rope, length)
        if partner is None:
            for block in self.blocks:
                stream.tokens = block(stream.tokens, e0, ctx, rope)
        else:
            partner(lambda i, s: self(s, layer=i), stream)
        out = self.head(stream.tokens, e)
        return out.transpose(1, 2)  # (B, L, 128) -> (B, 128, L): one token per latent frame
