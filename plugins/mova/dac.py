"""MOVA's audio VAE (``audio_vae/``): the continuous DAC codec, weight norm already fused.

48 kHz mono; encoder rates (2, 3, 4, 5, 8) give a hop of 960 samples (50 latent frames per
second); 128 latent channels, **not** normalised.  ``state_dict()`` is the published key set
(224 tensors for the release config): plain ``weight``/``bias`` per convolution (the release
fused the weight norm; a weight-norm parametrised module would expect ``weight_g``/``weight_v``).

* ``Snake(x) = x + sin²(α·x) / (α + 1e-9)``, per-channel ``alpha`` of shape ``(1, C, 1)``.
* ``ResidualUnit(C, dilation)``: Snake → Conv1d(k7, dilation, pad 3·dilation) → Snake → Conv1d(k1),
  plus the input (centre-cropped when lengths differ).
* Encoder ``encoder.block``: Conv1d(1→d, k7) → EncoderBlocks (Res ×3 at C/2, Snake, strided conv
  k = 2·stride, pad ⌈stride/2⌉), channels doubling → Snake → Conv1d(→latent, k3); then
  ``quant_conv`` (latent → 2·latent: mean ‖ log-variance); the latents are the mean.
* Decoder: ``post_quant_conv`` → ``decoder.model``: Conv1d(latent→D, k7) → DecoderBlocks (Snake,
  ConvTranspose1d k = 2·stride, pad ⌈stride/2⌉, output_padding stride mod 2, Res ×3), channels
  halving → Snake → Conv1d(→1, k7) → tanh.  ``960·L`` samples out; :meth:`AudioDAC.decode`
  trims to the requested length.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

__all__ = ["DACConfig", "DAC_RELEASE", "AudioDAC", "Snake1d", "ResidualUnit", "EncoderBlock", "DecoderBlock"]


@dataclass(frozen=True)
class DACConfig:
    """``audio_vae/config.json``; the defaults are the release values."""

    encoder_dim: int = 128
    encoder_rates: tuple[int, ...] = (2, 3, 4, 5, 8)
    latent_dim: int = 128
    decoder_dim: int = 2048
    decoder_rates: tuple[int, ...] = (8, 5, 4, 3, 2)
    sample_rate: int = 48000
    continuous: bool = True
    use_weight_norm: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_rates", tuple(int(r) for r in self.encoder_rates))
        object.__setattr__(self, "decoder_rates", tuple(int(r) for r in self.decoder_rates))
        if not self.continuous or self.use_weight_norm:
            raise ValueError(
                "audio VAE config: only the continuous DAC with fused weight norm (the release: continuous=true, "
                f"use_weight_norm=false) is implemented; got continuous={self.continuous}, use_weight_norm={self.use_weight_norm}"
            )
        if math.prod(self.encoder_rates) != math.prod(self.decoder_rates):
            raise ValueError(f"audio VAE config: encoder rates {self.encoder_rates} and decoder rates "
                             f"{self.decoder_rates} have different hops")

    @property
    def hop_length(self) -> int:
        return math.prod(self.encoder_rates)

    # Official class defaults (the 44.1 kHz discrete codec) for keys a config.json leaves out.
    CLASS_DEFAULTS = {
        "encoder_dim": 64, "encoder_rates": [2, 4, 8, 8], "latent_dim": None, "decoder_dim": 1536,
        "decoder_rates": [8, 8, 4, 2], "sample_rate": 44100, "continuous": False, "use_weight_norm": True,
    }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "DACConfig":
        values = {k: data.get(k, v) for k, v in cls.CLASS_DEFAULTS.items()}
        if values["latent_dim"] is None:  # the official rule
            values["latent_dim"] = values["encoder_dim"] * 2 ** len(values["encoder_rates"])
        return cls(**values)

    def to_json_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["encoder_rates"], d["decoder_rates"] = list(self.encoder_rates), list(self.decoder_rates)
        return {"_class_name": "DAC", **d}

    @classmethod
    def tiny(cls, **overrides: Any) -> "DACConfig":
        """Release rates (hop 960, 48 kHz) with 4 encoder / 32 decoder channels and 128 latents."""
        return replace(cls(encoder_dim=4, decoder_dim=32), **overrides)


DAC_RELEASE = DACConfig()
"""The released ``audio_vae`` (224 tensors, 371.5 M parameters)."""


class Snake1d(nn.Module):
    """``x + sin²(α·x) / (α + 1e-9)`` with a learned per-channel α."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int = 1):
        super().__init__()
        pad = 3 * dilation
        self.block = nn.Sequential(
            Snake1d(dim), nn.Conv1d(dim, dim, kernel_size=7, dilation=dilation, padding=pad),
            Snake1d(dim), nn.Conv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        crop = (x.shape[-1] - y.shape[-1]) // 2
        if crop > 0:
            x = x[..., crop:-crop]
        return x + y


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            ResidualUnit(dim // 2, 1), ResidualUnit(dim // 2, 3), ResidualUnit(dim // 2, 9), Snake1d(dim // 2),
            nn.Conv1d(dim // 2, dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DecoderBlock(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(input_dim),
            nn.ConvTranspose1d(input_dim, output_dim, kernel_size=2 * stride, stride=stride,
                               padding=math.ceil(stride / 2), output_padding=stride % 2),
            ResidualUnit(output_dim, 1), ResidualUnit(output_dim, 3), ResidualUnit(output_dim, 9),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DACEncoder(nn.Module):
    def __init__(self, d_model: int, strides: Sequence[int], d_latent: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(1, d_model, kernel_size=7, padding=3)]
        for stride in strides:
            d_model *= 2
            layers.append(EncoderBlock(d_model, stride))
        layers += [Snake1d(d_model), nn.Conv1d(d_model, d_latent, kernel_size=3, padding=1)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DACDecoder(nn.Module):
    def __init__(self, input_channel: int, channels: int, rates: Sequence[int], d_out: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(input_channel, channels, kernel_size=7, padding=3)]
        out_dim = channels
        for i, stride in enumerate(rates):
            in_dim, out_dim = channels // 2**i, channels // 2 ** (i + 1)
            layers.append(DecoderBlock(in_dim, out_dim, stride))
        layers += [Snake1d(out_dim), nn.Conv1d(out_dim, d_out, kernel_size=7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class AudioDAC(nn.Module):
    """``encode(audio (B,1,N)) -> latents (B,128,⌈N/960⌉)``, ``decode(latents, length) -> (B,1,length)``."""

    def __init__(self, config: DACConfig):
        super().__init__()
        self.config = c = config
        self.sample_rate, self.hop_length = c.sample_rate, c.hop_length
        self.encoder = DACEncoder(c.encoder_dim, c.encoder_rates, c.latent_dim)
        self.quant_conv = nn.Conv1d(c.latent_dim, 2 * c.latent_dim, 1)
        self.post_quant_conv = nn.Conv1d(c.latent_dim, c.latent_dim, 1)
        self.decoder = DACDecoder(c.latent_dim, c.decoder_dim, c.decoder_rates)

    def latent_length(self, samples: int) -> int:
        """Latent frames for ``samples`` audio samples: ``⌊(N−1)/hop⌋ + 1``."""
        return (samples - 1) // self.hop_length + 1

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio ``(B, 1, N)`` in [-1, 1] → posterior mean ``(B, latent, ⌈N/hop⌉)`` (right-padded to a
        multiple of the hop first, as the official preprocessing)."""
        if audio.dim() != 3 or audio.shape[1] != 1:
            raise ValueError(f"AudioDAC.encode: expected mono audio (B, 1, samples), got shape {tuple(audio.shape)}")
        pad = -audio.shape[-1] % self.hop_length
        x = nn.functional.pad(audio.to(self.quant_conv.weight.dtype), (0, pad))
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : self.config.latent_dim]

    def decode(self, latents: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Latents ``(B, latent, L)`` → waveform ``(B, 1, hop·L)`` in [-1, 1], trimmed to ``length``."""
        if latents.dim() != 3 or latents.shape[1] != self.config.latent_dim:
            raise ValueError(f"AudioDAC.decode: expected latents (B, {self.config.latent_dim}, L), got shape {tuple(latents.shape)}")
        audio = self.decoder(self.post_quant_conv(latents.to(self.post_quant_conv.weight.dtype)))
        if length is not None:
            if length > audio.shape[-1]:
                raise ValueError(f"AudioDAC.decode: {length} samples requested, the latents decode to {audio.shape[-1]}")
            audio = audio[..., :length]
        return audio

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(audio), length)``."""
        return self.decode(self.encode(audio), audio.shape[-1])
