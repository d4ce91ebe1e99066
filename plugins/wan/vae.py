"""Wan2.1 video VAE (``Wan2.1_VAE.pth``; z_dim 16, stride 8×8 in space and 4 in time).

Plain PyTorch modules whose ``state_dict()`` is the official checkpoint layout (docs/models.md, Wan VAEs; fingerprint ``ccc42284ea13e1ad04693284c7a09be6``): ``torch.load(path, mmap=True,
weights_only=True)`` followed by ``load_state_dict(strict=True)`` needs no key conversion.

The building blocks (causal conv with a temporal cache, ``RMS_norm``, residual, attention and
resample blocks) and the tiled decoder are shared with the Wan2.2 VAE in ``vae22.py``.

Temporal processing follows the official code exactly (docs/models.md, Wan VAEs):

* the encoder sees frame 0 alone, then chunks of 4 frames; each chunk yields one latent frame;
* the decoder sees one latent frame at a time; the first yields 1 frame, every later one 4,
  so ``F = 1 + 4(T-1)``;
* every causal conv with a temporal kernel of 3 is fed the last 2 frames of its own input
  history (zeros before the first chunk);
* the first chunk skips ``time_conv`` in down3d and up3d resamplers.

A single non-chunked pass over the whole video is *not* equivalent, so there is none here.
The cache lives in a list created per ``encode``/``decode`` call (no state on the module), and
the per-chunk graph only branches on Python values that are fixed per chunk (``first``,
whether a cache slot is filled), never on tensor values.

Latent normalisation happens inside :meth:`WanVAE.encode` and :meth:`WanVAE.decode`
(``z = (μ - mean) / std``, constants of docs/models.md, Wan VAEs); pass ``normalize=False`` /
``normalized=False`` to work with raw μ. The helpers :meth:`WanVAE.normalize_latents` and
:meth:`WanVAE.denormalize_latents` do only that step.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WAN21_VAE_CONFIG",
    "WAN21_VAE_TINY_CONFIG",
    "CausalConv3d",
    "RMS_norm",
    "ResidualBlock",
    "AttentionBlock",
    "Resample",
    "Encoder3d",
    "Decoder3d",
    "WanVAE",
    "tiled_decode",
]

CACHE_T = 2
"""Frames of input history each temporal-kernel-3 causal conv keeps between chunks."""

MARGIN = 0.25
"""Tiled decode: fraction of each tile overlap ignored at the tile's inner edge."""

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

WAN21_VAE_CONFIG = dict(dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                        temporal_downsample=(False, True, True))
"""The released ``Wan2.1_VAE.pth`` (194 tensors, 126.9 M parameters)."""

WAN21_VAE_TINY_CONFIG = dict(dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                             temporal_downsample=(False, True, True))
"""Same graph and key names with 8/16/32/32 channels, for tests and the ``tiny`` preset."""


# --------------------------------------------------------------------------------------------
# Building blocks (shared with vae22.py)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: ``2·p_t`` frames in front, none behind.

    With a ``cache`` list the layer keeps the last ``CACHE_T`` frames of its input in
    ``cache[self.cache_slot]`` and prepends them to the next chunk instead of zeros.  Before the
    first chunk the history is zeros, which is what the official code's zero padding computes.
    Slots are numbered by :func:`assign_cache_slots`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        pt, ph, pw = self.padding
        self._time_pad = 2 * pt
        self._space_pad = (pw, pw, ph, ph, 0, 0)
        self.padding = (0, 0, 0)
        self.cache_slot = -1

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        tp = self._time_pad
        if cache is None or tp == 0:
            pad = self._space_pad[:4] + (tp, 0)
            return super().forward(F.pad(x, pad) if any(pad) else x)
        prev = cache[self.cache_slot]
        if prev is None:
            prev = x.new_zeros(x.shape[0], x.shape[1], tp, x.shape[3], x.shape[4])
        x = torch.cat([prev, x], dim=2)
        # clone: a view would keep this whole chunk alive until the next one
        cache[self.cache_slot] = x[:, :, -CACHE_T:].clone()
        return super().forward(F.pad(x, self._space_pad) if any(self._space_pad) else x)


class RMS_norm(nn.Module):
    """``F.normalize(x, dim=1) · √C · γ``: an L2 normalisation over channels (eps 1e-12 on the
    norm), not a mean-square RMSNorm with eps 1e-6 (docs/models.md, Wan VAEs).  ``γ`` is (C,1,1,1) for
    video tensors and (C,1,1) for the per-frame images inside attention."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class _Upsample(nn.Upsample):
    # nearest-exact has no bf16 kernel on some backends; the official code upcasts too
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class Resample(nn.Module):
    """Spatial ×2 up/down sampling per frame, optionally with a temporal ×2 ``time_conv``.

    ``mode`` is ``upsample2d``, ``upsample3d``, ``downsample2d`` or ``downsample3d``.  The up
    convs map C → ``up_dim`` (C/2 in Wan2.1, C in Wan2.2).  On the ``first`` chunk the 3-D
    modes skip ``time_conv`` so one frame stays one frame.
    """

    def __init__(self, dim: int, mode: str, up_dim: int | None = None):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"Resample mode {mode!r}: expected up/downsample 2d/3d")
        self.dim = dim
        self.mode = mode
        self.cache_slot = -1
        if mode.startswith("upsample"):
            up_dim = dim // 2 if up_dim is None else up_dim
            self.resample = nn.Sequential(_Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, up_dim, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                          nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
        if self.mode == "upsample3d" and not first:
            b, c, t, h, w = x.shape
            x = self.time_conv(x, cache)
            # channels [0:C) become frame 2i, [C:2C) frame 2i+1
            x = torch.stack((x[:, :c], x[:, c:]), dim=3).reshape(b, c, 2 * t, h, w)
        b, c, t, h, w = x.shape
        x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        x = x.view(b, t, x.shape[1], x.shape[2], x.shape[3]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d":
            # time_conv (kernel 3, stride 2, no padding) sees [last frame of previous chunk, chunk]
            last = x[:, :, -1:].clone()
            if not first:
                x = self.time_conv(torch.cat([cache[self.cache_slot], x], dim=2))
            cache[self.cache_slot] = last
        return x


class ResidualBlock(nn.Module):
    """``residual``: RMS_norm → SiLU → conv 3³ → RMS_norm → SiLU → Dropout → conv 3³;
    ``shortcut``: 1³ conv when the width changes."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: list, first: bool = False) -> torch.Tensor:
        h = self.shortcut(x)
        r = self.residual
        x = r[2](r[1](r[0](x)), cache)
        x = r[6](r[5](r[4](r[3](x))), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h·w positions of each frame (scale 1/√C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: list | None = None, first: bool = False) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.shape
        x = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        qkv = self.to_qkv(x).reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        x = self.proj(x).view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return x + identity


def assign_cache_slots(module: nn.Module) -> int:
    """Number every cached layer under ``module``; returns the cache length to allocate."""
    n = 0
    for m in module.modules():
        if (isinstance(m, CausalConv3d) and m._time_pad > 0) or (
                isinstance(m, Resample) and m.mode == "downsample3d"):
            m.cache_slot = n
            n += 1
    return n


def _head(head: nn.Sequential, x: torch.Tensor, cache: list) -> torch.Tensor:
    return head[2](head[1](head[0](x)), cache)


# --------------------------------------------------------------------------------------------
# Wan2.1 encoder / decoder


class CausalStack(nn.Module):
    """``conv1``, then every layer of the stages named in ``stages`` in order, then ``head``; each
    layer takes the causal feature cache (the encoders and decoders of both VAE versions)."""

    stages: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
        x = self.conv1(x, cache)
        for stage in self.stages:
            for layer in getattr(self, stage):
                x = layer(x, cache, first)
        return _head(self.head, x, cache)


class Encoder3d(CausalStack):
    """``conv1`` → ``downsamples`` (flat: res blocks and resamplers) → ``middle`` → ``head``."""

    stages = ("downsamples", "middle")

    def __init__(self, dim: int = 96, z_dim: int = 32, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temporal_downsample: Sequence[bool] = (False, True, True),
                 dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim, dropout), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim, dropout))
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, z_dim, 3, padding=1))



class Decoder3d(CausalStack):
    """``conv1`` → ``middle`` → ``upsamples`` (flat) → ``head``; up convs halve the width."""

    stages = ("middle", "upsamples")

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temporal_upsample: Sequence[bool] = (True, True, False),
                 dropout: float = 0.0, out_channels: int = 3):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], dropout))
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous Resample halved the width
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, out_channels, 3, padding=1))



# --------------------------------------------------------------------------------------------
# Tiled decode (shared with vae22.py)


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis; every tile has the same length (the last one is shifted
    back to end at ``size``), so a compiled decoder sees one tile shape."""
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(n: int, left: int, right: int, device, dtype, margin: float = MARGIN) -> torch.Tensor:
    """Blend weights over ``n`` pixels of a tile whose edges overlap a neighbour by ``left`` and
    ``right`` pixels (0: the edge is the frame's border).

    The outer ``margin`` fraction of each overlap gets weight 0 (those pixels saw zero padding
    where the neighbour saw real context), the middle part a linear ramp; the neighbour's
    ramp mirrors it, so the weights of two adjacent tiles sum to 1 across the overlap.
    """
    i = torch.arange(n, device=device, dtype=torch.float64)
    w = torch.ones(n, device=device, dtype=torch.float64)
    for o, d in ((left, i), (right, n - 1 - i)):
        if o > 0:
            m = int(o * margin)
            w = w * ((d - m + 1) / (o - 2 * m + 1)).clamp(0, 1)
    return w.clamp_min(1e-6).to(dtype)


def tiled_decode(decode_tile: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
                 tile: tuple[int, int], stride: tuple[int, int], scale: int) -> torch.Tensor:
    """Decode ``z`` (B,C,T,h,w) tile by tile in space and blend the overlaps linearly.

    ``tile`` and ``stride`` are in latent units; ``decode_tile`` maps a latent tile to pixels
    (×``scale`` in space).  Each tile runs the full causal decode with its own temporal cache.
    Peak memory is the output video plus one tile's decode instead of the whole frame's.
    """
    th, tw = tile
    sh, sw = stride
    if not (0 < sh <= th and 0 < sw <= tw):
        raise ValueError(f"tiled decode: need 0 < stride <= tile, got tile={tile}, stride={stride}")
    B, _, T, h, w = z.shape
    th, tw = min(th, h), min(tw, w)
    hs, ws = _tile_starts(h, th, sh), _tile_starts(w, tw, sw)
    out = weight = None
    for a, y0 in enumerate(hs):
        top = (hs[a - 1] + th - y0) * scale if a > 0 else 0
        bottom = (y0 + th - hs[a + 1]) * scale if a + 1 < len(hs) else 0
        for b_, x0 in enumerate(ws):
            left = (ws[b_ - 1] + tw - x0) * scale if b_ > 0 else 0
            right = (x0 + tw - ws[b_ + 1]) * scale if b_ + 1 < len(ws) else 0
            pix = decode_tile(z[:, :, :, y0:y0 + th, x0:x0 + tw])
            if out is None:
                out = pix.new_zeros(B, pix.shape[1], pix.shape[2], h * scale, w * scale)
                weight = pix.new_zeros(h * scale, w * scale)
            m = (_ramp(pix.shape[-2], top, bottom, pix.device, pix.dtype)[:, None]
                 * _ramp(pix.shape[-1], left, right, pix.device, pix.dtype)[None, :])
            ys, xs = slice(y0 * scale, y0 * scale + pix.shape[-2]), slice(x0 * scale, x0 * scale + pix.shape[-1])
            out[..., ys, xs] += pix * m
            weight[ys, xs] += m
            del pix
    return out.div_(weight)


# --------------------------------------------------------------------------------------------
# The VAE


class WanVAE(nn.Module):
    """Wan2.1 video VAE: ``encode(video) -> latents`` and ``decode(latents) -> video``.

    Keys: ``encoder.*``, ``conv1`` (1³, 2z→2z, μ ‖ logσ²), ``conv2`` (1³, z→z), ``decoder.*``.
    Runs in whatever dtype its parameters have; the official inference dtype is fp32.

    Tiled decode (``decode(..., tiled=True, tile=(th, tw), stride=(sh, sw))``, latent units)
    runs the full causal decode per spatial tile, drops the outer quarter of each overlap
    (those pixels saw zero padding instead of context) and blends the rest with linear ramps.
    Peak memory is the model, the output video, and *one tile's* decode, independent of the
    frame size.  Measured on CPU (fp32, official-size Wan2.1 VAE with random weights, T = 2
    latent frames → 5 video frames, tile (16,16), stride (12,12); peak RSS by
    ``getrusage``, 0.70 GiB of it the process after building the model)::

        latent 32×32 (256×256 px):  untiled 2.35 GiB   tiled 1.24 GiB
        latent 64×64 (512×512 px):  untiled 6.54 GiB   tiled 1.27 GiB
        latent 32×32, T = 5 (17 frames):                tiled 1.31 GiB

    (``python tests/wan/test_vae.py measure {tiled|untiled} T h w``.)  Untiled memory grows
    with H·W (the per-chunk activations and 2-frame caches of every full-resolution conv).
    Chunks run one after another into a preallocated output, so beyond that output buffer
    (3·F·H·W floats) memory does not grow with T (T = 2 → 5 added 0.07 GiB).

    Accuracy: a single tile covering the latent is bit-identical to the untiled decode.
    Overlapping tiles are an approximation: with the *tiny random-weight* test config, latents
    16×16, tile (12,12), stride (4,4), max |tiled − untiled| = 0.35 (mean 0.028) on outputs in
    [-1,1] (Wan2.2: 0.55 / 0.040) — random weights make the receptive field and the per-frame
    attention of the middle block global.  Use large overlaps (the defaults are DiffSynth's
    (30,52) / (15,26)) and measure on real weights before relying on it.
    """

    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    spatial_stride: int = 8
    temporal_stride: int = 4
    default_tile = (30, 52)
    default_stride = (15, 26)

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temporal_downsample: Sequence[bool] = (False, True, True),
                 dropout: float = 0.0):
        super().__init__()
        if z_dim != len(self.latents_mean):
            raise ValueError(f"WanVAE: z_dim {z_dim} has no normalisation constants "
                             f"(expected {len(self.latents_mean)})")
        self.z_dim = z_dim
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, temporal_downsample, dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, tuple(temporal_downsample)[::-1], dropout)
        self._enc_slots = assign_cache_slots(self.encoder)
        self._dec_slots = assign_cache_slots(self.decoder)

    # -- normalisation -------------------------------------------------------------------

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        inv_std = 1.0 / torch.tensor(self.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, inv_std

    def normalize_latents(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw μ → the latents the DiT works on: ``(μ - mean) · (1/std)`` (as the official code)."""
        mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize_latents`: ``z / (1/std) + mean``."""
        mean, inv_std = self._stats(z)
        return z / inv_std + mean

    # -- video <-> raw latents -------------------------------------------------------------

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5:
            raise ValueError(f"{type(self).__name__}.encode: expected a video (B,3,F,H,W), got shape "
                             f"{tuple(video.shape)}")
        f, hh, ww = video.shape[2:]
        s = self.spatial_stride
        if (f - 1) % self.temporal_stride or hh % s or ww % s:
            raise ValueError(f"{type(self).__name__}.encode: video shape {tuple(video.shape)} needs "
                             f"F = 1 + 4k and H, W multiples of {s}")

    def encode(self, video: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Video (B,3,F,H,W) in [-1,1], F = 1+4k → latents (B,z,1+k,H/s,W/s).

        Returns normalised latents (raw μ if ``normalize=False``); μ only, no sampling.
        """
        self._check_video(video)
        x = self._patchify(video)
        cache: list = [None] * self._enc_slots
        outs = [self.encoder(x[:, :, :1], cache, True)]
        for i in range(1, 1 + (x.shape[2] - 1) // 4):
            outs.append(self.encoder(x[:, :, 1 + 4 * (i - 1):1 + 4 * i], cache, False))
        mu = self.conv1(torch.cat(outs, dim=2))[:, :self.z_dim]
        return self.normalize_latents(mu) if normalize else mu

    def _decode_raw(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw μ → unclamped video, one latent frame per decoder call."""
        x = self.conv2(mu)
        cache: list = [None] * self._dec_slots
        T = x.shape[2]
        out = None
        for i in range(T):
            y = self.decoder(x[:, :, i:i + 1], cache, i == 0)
            if out is None:
                # preallocate instead of growing with torch.cat (which holds two copies)
                out = y.new_empty(y.shape[0], y.shape[1], 1 + 4 * (T - 1), y.shape[3], y.shape[4])
            j = 0 if i == 0 else 1 + 4 * (i - 1)
            out[:, :, j:j + y.shape[2]] = y
            del y
        return self._unpatchify(out)

    def decode(self, latents: torch.Tensor, normalized: bool = True, tiled: bool = False,
               tile: tuple[int, int] | None = None, stride: tuple[int, int] | None = None) -> torch.Tensor:
        """Latents (B,z,T,h,w) → video (B,3,1+4(T-1),h·s,w·s) clamped to [-1,1].

        ``normalized``: the latents are normalised (the default; what :meth:`encode` returns).
        ``tiled``: decode overlapping spatial tiles of ``tile`` latents every ``stride`` latents
        (defaults :attr:`default_tile` / :attr:`default_stride`) and blend them; see the class
        docstring for the measured memory and accuracy.
        """
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"{type(self).__name__}.decode: expected latents (B,{self.z_dim},T,h,w), "
                             f"got shape {tuple(latents.shape)}")
        mu = self.denormalize_latents(latents) if normalized else latents
        if tiled:
            video = tiled_decode(self._decode_raw, mu, tuple(tile or self.default_tile),
                                 tuple(stride or self.default_stride), self.spatial_stride)
        else:
            video = self._decode_raw(mu)
        return video.clamp_(-1.0, 1.0)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction: ``decode(encode(video))``."""
        return self.decode(self.encode(video))
