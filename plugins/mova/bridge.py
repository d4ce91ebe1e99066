"""MOVA's dual-tower bridge (``dual_tower_bridge/``, the official ``DualTowerConditionalBridge``).

Before each shared layer ``i`` (the interaction layers of the config; ``"full"`` = every layer
both towers have), two conditional cross-attentions exchange information, both computed from
the streams as they were *before* this layer's update:

* a2v: ``video += Attn(q = video, k/v = LayerNorm(audio))`` with 5120/128 = 40 heads (release);
* v2a: ``audio += Attn(q = audio, k/v = LayerNorm(video))`` with 1536/128 = 12 heads.

Each is :class:`ConditionalCrossAttentionBlock`: LayerNorm (affine, eps 1e-6) of the condition
stream only, q/k RMSNorm over the whole width, rotary in the **rotate-half** convention (element
``i`` pairs with ``i + d/2``; unlike the towers' interleaved pairs) on *time-aligned* positions,
attention without mask, output projection; the residual (scale 1) is added by the bridge.

Aligned positions (audio is the reference clock): audio token ``j`` sits at ``j``; every video
token of latent frame ``f`` at ``f · audio_fps / (video_fps / 4)`` (8.333·f at 24 fps, 50 Hz
audio latents; the 4 is the video VAE's temporal stride).  ``inv_freq_j = 10000^(−2j/d)``,
angles in float32 as the official code.

The official class defaults (3072 wide, 44100/2048 fps, ``"shallow_focus"``, rotary off) differ
from the release config; :meth:`BridgeConfig.from_json_dict` reads ``config.json`` with the
class defaults for absent keys, so a folder's file decides.

Unified Sequence Parallelism: the bridge runs inside the towers' sequence-parallel pass and
receives both streams as this rank's shards.  Its position tables are computed at full length
(``video_rope``, ``audio_rope``) and split like the towers' tokens (sequences ``"video"`` and
``"audio"``), so each local token keeps its own aligned position.  Queries stay local; the other
stream's keys/values (rotated by their own positions first) are all-gathered (sites ``"a2v"``
and ``"v2a"``, strategy ``gather_kv``), padding cut, so the result is exact for any length.  The
outputs stay split: the towers gather their streams at their heads.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.attention import attention
from plugins.wan.dit import WanRMSNorm

__all__ = [
    "BridgeConfig", "BRIDGE_RELEASE", "DualTowerConditionalBridge", "ConditionalCrossAttentionBlock",
    "ConditionalCrossAttention", "AlignedRotary", "apply_rope_half", "interaction_layers",
]


def interaction_layers(strategy: str, visual_layers: int, audio_layers: int) -> list[int]:
    """The layers at which the towers interact (the official controller's strategies)."""
    n = min(visual_layers, audio_layers)
    if strategy == "full":
        return list(range(n))
    if strategy == "shallow_focus":
        return list(range(min(10, n // 3)))
    if strategy == "distributed":
        return list(range(0, n, 3))
    if strategy == "progressive":
        return list(range(min(8, n))) + (list(range(8, n, 3)) if n > 8 else [])
    if strategy == "custom":
        return [i for i in (0, 2, 4, 6, 8, 12, 16, 20) if i < n]
    raise ValueError(f"bridge interaction_strategy {strategy!r} is not one of full, shallow_focus, distributed, progressive, custom")


@dataclass(frozen=True)
class BridgeConfig:
    """``dual_tower_bridge/config.json``; the defaults are the **release** values."""

    visual_layers: int = 40
    audio_layers: int = 30
    visual_hidden_dim: int = 5120
    audio_hidden_dim: int = 1536
    audio_fps: float = 50.0
    head_dim: int = 128
    interaction_strategy: str = "full"
    apply_cross_rope: bool = True
    apply_first_frame_bias_in_rope: bool = False
    trainable_condition_scale: bool = False
    pooled_adaln: bool = False
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.trainable_condition_scale or self.pooled_adaln:
            raise ValueError(
                "bridge config: trainable_condition_scale and pooled_adaln are not implemented (the release "
                f"has both false); got {self.trainable_condition_scale}, {self.pooled_adaln}"
            )
        for name in ("visual_hidden_dim", "audio_hidden_dim"):
            if getattr(self, name) % self.head_dim:
                raise ValueError(f"bridge config: {name} {getattr(self, name)} is not a multiple of head_dim {self.head_dim}")
        if self.head_dim % 2:
            raise ValueError(f"bridge config: head_dim {self.head_dim} must be even (rotate-half rotary)")
        interaction_layers(self.interaction_strategy, self.visual_layers, self.audio_layers)

    @property
    def a2v_heads(self) -> int:
        return self.visual_hidden_dim // self.head_dim

    @property
    def v2a_heads(self) -> int:
        return self.audio_hidden_dim // self.head_dim

    @property
    def num_heads(self) -> int:
        """The heads one Ulysses degree must divide in both directions: gcd(a2v, v2a) (4 released)."""
        return math.gcd(self.a2v_heads, self.v2a_heads)

    @property
    def layers(self) -> list[int]:
        return interaction_layers(self.interaction_strategy, self.visual_layers, self.audio_layers)

    # The official class defaults, used for keys a config.json leaves out (MOVA's class defaults
    # differ from the release; the file decides).
    CLASS_DEFAULTS = {
        "visual_layers": 30, "audio_layers": 30, "visual_hidden_dim": 3072, "audio_hidden_dim": 1536,
        "audio_fps": 44100.0 / 2048.0, "head_dim": 128, "interaction_strategy": "shallow_focus",
        "apply_cross_rope": False, "apply_first_frame_bias_in_rope": False,
        "trainable_condition_scale": False, "pooled_adaln": False,
    }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "BridgeConfig":
        return cls(**{k: data.get(k, v) for k, v in cls.CLASS_DEFAULTS.items()})

    def to_json_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("eps")
        return {"_class_name": "DualTowerConditionalBridge", **d}

    @classmethod
    def tiny(cls, **overrides: Any) -> "BridgeConfig":
        """Matches the tiny towers: video 128 wide, audio 64, 3 / 2 layers; heads of 16 (a2v 8, v2a 4)."""
        return replace(cls(visual_layers=3, audio_layers=2, visual_hidden_dim=128, audio_hidden_dim=64, head_dim=16),
                       **overrides)


BRIDGE_RELEASE = BridgeConfig()
"""The released bridge (720 tensors, 2.660 B parameters)."""


def apply_rope_half(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on ``x: (B, L, H, d)`` with ``rope: (1, L, 1, d, 2)`` (cos, sin over the
    whole d, halves duplicated): ``x·cos + [−x₂, x₁]·sin``, in float32, returned in x's dtype."""
    cos, sin = rope.unbind(-1)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class AlignedRotary(nn.Module):
    """Rotate-half table for positions ``(L,)`` float32 → ``(1, L, 1, d, 2)`` float32; no parameters."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d))
        angles = positions.float()[:, None] * inv_freq[None]
        angles = torch.cat([angles, angles], dim=-1)
        return torch.stack([angles.cos(), angles.sin()], dim=-1)[None, :, None]


class VideoPositions(AlignedRotary):
    """``forward(frames, tokens_per_frame, video_fps)``: the video stream's table (frames slowest)."""

    def __init__(self, head_dim: int, audio_fps: float, first_frame_bias: bool, temporal_stride: int = 4):
        super().__init__(head_dim)
        self.audio_fps, self.first_frame_bias, self.temporal_stride = audio_fps, first_frame_bias, temporal_stride

    def forward(self, frames: int, tokens_per_frame: int, video_fps: float, device=None) -> torch.Tensor:
        if self.first_frame_bias:
            # latent frame 0 covers one video frame; each later one covers `temporal_stride` frames
            starts = torch.zeros(frames, dtype=torch.float32, device=device)
            if frames > 1:
                starts[1:] = 1.0 / float(video_fps) + torch.arange(frames - 1, dtype=torch.float32, device=device) * (
                    self.temporal_stride / float(video_fps))
            per_frame = starts * float(self.audio_fps)
        else:
            scale = float(self.audio_fps) / (float(video_fps) / self.temporal_stride)
            per_frame = torch.arange(frames, dtype=torch.float32, device=device) * scale
        return super().forward(per_frame.repeat_interleave(tokens_per_frame))


class AudioPositions(AlignedRotary):
    """``forward(length)``: audio token ``j`` at position ``j``."""

    def forward(self, length: int, device=None) -> torch.Tensor:
        return super().forward(torch.arange(length, dtype=torch.float32, device=device))


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer(x.to(layer.weight.dtype))


class ConditionalCrossAttention(nn.Module):
    """q from ``x`` (width ``dim``), k/v from ``y`` (width ``kv_dim``); ``site`` names the call."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, site: str, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.site = num_heads, site
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def forward(self, x, y, x_rope=None, y_rope=None):
        q = self.norm_q(_linear(self.q, x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(_linear(self.k, y)).unflatten(-1, (self.num_heads, -1))
        v = _linear(self.v, y).unflatten(-1, (self.num_heads, -1))
        if x_rope is not None:
            q = apply_rope_half(q, x_rope)
        if y_rope is not None:
            k = apply_rope_half(k, y_rope)
        return _linear(self.o, attention(q, k, v, site=self.site).flatten(2))


class ConditionalCrossAttentionBlock(nn.Module):
    """LayerNorm of the condition ``y`` (the primary ``x`` is not normalised), then the attention."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, site: str, eps: float = 1e-6):
        super().__init__()
        self.y_norm = nn.LayerNorm(kv_dim, eps=eps)
        self.inner = ConditionalCrossAttention(dim, kv_dim, num_heads, site, eps)

    def forward(self, x, y, x_rope=None, y_rope=None):
        y = F.layer_norm(y.float(), self.y_norm.normalized_shape, self.y_norm.weight.float(),
                         self.y_norm.bias.float(), self.y_norm.eps).to(self.inner.k.weight.dtype)
        return self.inner(x, y, x_rope, y_rope)


class AudioToVideoBlock(ConditionalCrossAttentionBlock):
    """a2v (x = video, y = audio): its own class and ``forward`` code, so the compile engine holds one
    graph per direction (the two directions have different widths)."""

    def forward(self, x, y, x_rope=None, y_rope=None):
        return super().forward(x, y, x_rope, y_rope)


class VideoToAudioBlock(ConditionalCrossAttentionBlock):
    """v2a (x = audio, y = video); see :class:`AudioToVideoBlock`."""

    def forward(self, x, y, x_rope=None, y_rope=None):
        return super().forward(x, y, x_rope, y_rope)


class DualTowerConditionalBridge(nn.Module):
    """Both conditioners per interaction layer; ``state_dict()`` is the published key set
    (``audio_to_video_conditioners.{i}.*``, ``video_to_audio_conditioners.{i}.*``)."""

    _repeated_blocks = ("AudioToVideoBlock", "VideoToAudioBlock")

    def __init__(self, config: BridgeConfig):
        super().__init__()
        self.config = c = config
        self.video_rope = VideoPositions(c.head_dim, c.audio_fps, c.apply_first_frame_bias_in_rope)
        self.audio_rope = AudioPositions(c.head_dim)
        self.audio_to_video_conditioners = nn.ModuleDict({
            str(i): AudioToVideoBlock(c.visual_hidden_dim, c.audio_hidden_dim, c.a2v_heads, "a2v", c.eps)
            for i in c.layers})
        self.video_to_audio_conditioners = nn.ModuleDict({
            str(i): VideoToAudioBlock(c.audio_hidden_dim, c.visual_hidden_dim, c.v2a_heads, "v2a", c.eps)
            for i in c.layers})

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def interacts(self, layer: int) -> bool:
        return str(layer) in self.audio_to_video_conditioners

    def forward(self, layer: int, video: torch.Tensor, audio: torch.Tensor, *, grid: tuple[int, int, int],
                audio_length: int, video_fps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Both directions at ``layer`` from the pre-update streams.

        ``video``: ``(B, L_v, visual_dim)`` tokens (frames slowest); ``audio``: ``(B, L_a, audio_dim)``;
        ``grid``: the video token grid ``(f, h, w)`` with ``L_v = f·h·w``; ``audio_length``: ``L_a``;
        ``video_fps``: the pixel frame rate.  Under USP both streams are this rank's shards and
        ``grid``/``audio_length`` the full sizes.  Returns ``(video', audio')`` float32.
        """
        key = str(layer)
        if key not in self.audio_to_video_conditioners:
            return video, audio
        # The tables are built even with rotary off: under USP their splits are what tell the
        # bridge which token ranges of each stream this rank holds.
        v_rope = self.video_rope(grid[0], grid[1] * grid[2], video_fps, device=video.device)
        a_rope = self.audio_rope(audio_length, device=audio.device)
        if not self.config.apply_cross_rope:
            v_rope = a_rope = None
        a2v = self.audio_to_video_conditioners[key](video, audio, v_rope, a_rope)
        v2a = self.video_to_audio_conditioners[key](audio, video, a_rope, v_rope)
        return video.float() + a2v.float(), audio.float() + v2a.float()
