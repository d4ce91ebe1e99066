"""Wan2.2 video VAE (``Wan2.2_VAE.pth``, TI2V-5B; z_dim 48, stride 16×16 in space, 4 in time).

``state_dict()`` is the official layout (docs/models.md, Wan VAEs; fingerprint
``e1de6c02cdac79f8b739f4d3698cd216``).  Differences from Wan2.1 (``vae.py``, whose blocks,
temporal cache rules, normalisation handling and tiled decode are reused):

* 2×2 pixel patches → 12 channels before the encoder, channel ``c·4 + r·2 + q`` with r the
  width offset and q the height offset; the inverse after the decoder;
* blocks: ``encoder.downsamples.i.downsamples.{0,1}`` residual blocks + ``.2`` resampler, and
  ``decoder.upsamples.i.upsamples.{0,1,2}`` + ``.3``, each block with a parameter-free
  space/time-to-channel shortcut (AvgDown3D / DupUp3D);
* resample convs keep the width (C → C);
* separate decoder width (256 → 1024/1024/1024/512/256).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae import (AttentionBlock, CausalConv3d, CausalStack, RMS_norm, Resample, ResidualBlock, WanVAE,
                  assign_cache_slots)

__all__ = [
    "WAN22_LATENTS_MEAN",
    "WAN22_LATENTS_STD",
    "WAN22_VAE_CONFIG",
    "WAN22_VAE_TINY_CONFIG",
    "AvgDown3D",
    "DupUp3D",
    "Encoder3d22",
    "Decoder3d22",
    "Wan22VAE",
    "patchify",
    "unpatchify",
]

WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

WAN22_VAE_CONFIG = dict(dim=160, dec_dim=256, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                        temporal_downsample=(False, True, True))
"""The released ``Wan2.2_VAE.pth`` (196 tensors, 704.7 M parameters)."""

WAN22_VAE_TINY_CONFIG = dict(dim=8, dec_dim=8, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                             temporal_downsample=(False, True, True))
"""Same graph and key names with few channels, for tests and the ``tiny`` preset."""


def patchify(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """(B,C,F,H,W) → (B,C·p·p,F,H/p,W/p), channel ``c·p² + r·p + q`` (r: width, q: height)."""
    b, c, f, h, w = x.shape
    x = x.view(b, c, f, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, f, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, cpp, f, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, f, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), f, h * p, w * p)


class AvgDown3D(nn.Module):
    """Parameter-free shortcut: space/time-to-channel, then the mean over groups of channels.
    Time is zero-padded in front to a multiple of ``factor_t`` (so a 1-frame first chunk is
    averaged with a zero frame, as in the official code)."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels = out_channels
        self.factor_t, self.factor_s = factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if in_channels * factor % out_channels:
            raise ValueError(f"AvgDown3D: {in_channels}·{factor} channels do not group into {out_channels}")
        self.group_size = in_channels * factor // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        pad_t = (ft - x.shape[2] % ft) % ft
        if pad_t:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_channels, self.group_size, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut: repeat channels, then channel-to-space/time.  On the first
    chunk the first ``factor_t - 1`` frames are dropped (1 latent frame → 1 frame)."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels = out_channels
        self.factor_t, self.factor_s = factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if out_channels * factor % in_channels:
            raise ValueError(f"DupUp3D: {out_channels}·{factor} channels are not a multiple of {in_channels}")
        self.repeats = out_channels * factor // in_channels

    def forward(self, x: torch.Tensor, first: bool = False) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = x.repeat_interleave(self.repeats, dim=1)
        b, _, t, h, w = x.shape
        x = x.view(b, self.out_channels, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first else x


class DownResidualBlock(nn.Module):
    """``downsamples``: residual blocks (+ resampler) with an :class:`AvgDown3D` shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, mult: int,
                 temporal_downsample: bool = False, down_flag: bool = False):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temporal_downsample else 1,
                                      factor_s=2 if down_flag else 1)
        layers: list[nn.Module] = []
        for _ in range(mult):
            layers.append(ResidualBlock(in_dim, out_dim, dropout))
            in_dim = out_dim
        if down_flag:
            layers.append(Resample(out_dim, "downsample3d" if temporal_downsample else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)
        for layer in self.downsamples:
            x = layer(x, cache, first)
        return x + shortcut


class UpResidualBlock(nn.Module):
    """``upsamples``: residual blocks (+ resampler) with a :class:`DupUp3D` shortcut when it
    upsamples."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, mult: int,
                 temporal_upsample: bool = False, up_flag: bool = False):
        super().__init__()
        self.avg_shortcut = (DupUp3D(in_dim, out_dim, factor_t=2 if temporal_upsample else 1, factor_s=2)
                             if up_flag else None)
        layers: list[nn.Module] = []
        for _ in range(mult):
            layers.append(ResidualBlock(in_dim, out_dim, dropout))
            in_dim = out_dim
        if up_flag:
            layers.append(Resample(out_dim, "upsample3d" if temporal_upsample else "upsample2d", up_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
        y = x
        for layer in self.upsamples:
            y = layer(y, cache, first)
        if self.avg_shortcut is not None:
            y = y + self.avg_shortcut(x, first)
        return y


class Encoder3d22(CausalStack):
    """``conv1`` (12 → dim) → 4 :class:`DownResidualBlock` → ``middle`` → ``head``."""

    stages = ("downsamples", "middle")

    def __init__(self, dim: int = 160, z_dim: int = 96, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temporal_downsample: Sequence[bool] = (False, True, True),
                 dropout: float = 0.0):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv1 = CausalConv3d(12, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*[
            DownResidualBlock(in_dim, out_dim, dropout, num_res_blocks,
                              temporal_downsample=temporal_downsample[i] if i < len(temporal_downsample) else False,
                              down_flag=i != len(dim_mult) - 1)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))])
        out_dim = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim, dropout), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim, dropout))
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, z_dim, 3, padding=1))



class Decoder3d22(CausalStack):
    """``conv1`` (z → 4·dim) → ``middle`` → 4 :class:`UpResidualBlock` → ``head`` (→ 12)."""

    stages = ("middle", "upsamples")

    def __init__(self, dim: int = 256, z_dim: int = 48, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temporal_upsample: Sequence[bool] = (True, True, False),
                 dropout: float = 0.0):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], dropout))
        self.upsamples = nn.Sequential(*[
            UpResidualBlock(in_dim, out_dim, dropout, num_res_blocks + 1,
                            temporal_upsample=temporal_upsample[i] if i < len(temporal_upsample) else False,
                            up_flag=i != len(dim_mult) - 1)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))])
        out_dim = dims[-1]
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, 12, 3, padding=1))



class Wan22VAE(WanVAE):
    """Wan2.2 video VAE (TI2V-5B); same interface as :class:`plugins.wan.vae.WanVAE`
    (``encode`` / ``decode`` with normalisation inside, ``tiled=True`` decode).

    Keys: ``encoder.*``, ``conv1`` (1³, 96→96), ``conv2`` (1³, 48→48), ``decoder.*``.
    Video H, W must be multiples of 16 (32 for the TI2V-5B DiT's 2×2 patches).
    """

    latents_mean = WAN22_LATENTS_MEAN
    latents_std = WAN22_LATENTS_STD
    spatial_stride = 16
    temporal_stride = 4
    default_tile = (30, 52)
    default_stride = (15, 26)

    def __init__(self, dim: int = 160, dec_dim: int = 256, z_dim: int = 48,
                 dim_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 temporal_downsample: Sequence[bool] = (False, True, True), dropout: float = 0.0):
        nn.Module.__init__(self)
        if z_dim != len(self.latents_mean):
            raise ValueError(f"Wan22VAE: z_dim {z_dim} has no normalisation constants "
                             f"(expected {len(self.latents_mean)})")
        self.z_dim = z_dim
        self.encoder = Encoder3d22(dim, z_dim * 2, dim_mult, num_res_blocks, temporal_downsample, dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d22(dec_dim, z_dim, dim_mult, num_res_blocks,
                                   tuple(temporal_downsample)[::-1], dropout)
        self._enc_slots = assign_cache_slots(self.encoder)
        self._dec_slots = assign_cache_slots(self.decoder)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, 2)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, 2)
