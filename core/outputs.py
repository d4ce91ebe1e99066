"""What a pipeline returns, and writers for the formats people open (PNG; MP4 and WAV below).

Files are written to a temporary name in the target folder and renamed into place, so an
interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["Output", "write_output", "register_writer", "atomic_path", "to_uint8", "write_png", "write_mp4", "write_wav"]


@dataclass
class Output:
    """A generation result. Images ``(B, 3, H, W)`` and video ``(B, 3, F, H, W)`` are float32 in
    [0, 1]; audio ``(B, channels, samples)`` is float32 in [-1, 1]."""

    kind: str
    images: torch.Tensor | None = None
    video: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    fps: float | None = None
    sample_rate: int | None = None

    def tensor(self) -> torch.Tensor:
        """The main tensor of this output kind."""
        value = {"image": self.images, "video": self.video, "audio": self.audio, "video+audio": self.video}[self.kind]
        assert value is not None, f"{self.kind} output without its tensor"
        return value


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8 (rounded, clamped)."""
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a written result is an ordinary file
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _batch_paths(path: Path, n: int) -> list[Path]:
    """``path`` for one item; ``stem_0.ext``, ``stem_1.ext``, ... for a batch."""
    return [path] if n == 1 else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(n)]


def write_png(output: Output, path: Path) -> list[Path]:
    """Images ``(B, 3, H, W)`` in [0, 1] → one PNG per batch item."""
    from PIL import Image

    images = output.images
    if images is None or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"PNG writer: expected images (B, 3, H, W), got {None if images is None else tuple(images.shape)}")
    paths = _batch_paths(path, images.shape[0])
    for img, p in zip(to_uint8(images), paths):
        with atomic_path(p) as tmp:
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    return paths


def _even_pad(frames: torch.Tensor) -> torch.Tensor:
    """(F, H, W, 3) uint8 padded to even H and W by repeating the last row/column (yuv420p needs even sizes)."""
    h, w = frames.shape[1:3]
    if h % 2:
        frames = torch.cat([frames, frames[:, -1:]], dim=1)
    if w % 2:
        frames = torch.cat([frames, frames[:, :, -1:]], dim=2)
    return frames


def write_mp4(output: Output, path: Path, *, crf: int = 18) -> list[Path]:
    """Video ``(B, 3, F, H, W)`` in [0, 1] → H.264 yuv420p MP4 per batch item, at ``output.fps``
    (16 if unset); with ``output.audio`` ``(B, channels, samples)`` in [-1, 1] an AAC track at
    ``output.sample_rate`` is muxed in."""
    from fractions import Fraction

    import av
    import numpy as np

    video, audio = output.video, output.audio
    fps = output.fps or 16
    sample_rate = output.sample_rate or 48000
    if video is None or video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"MP4 writer: expected video (B, 3, F, H, W), got {None if video is None else tuple(video.shape)}")
    paths = _batch_paths(path, video.shape[0])
    rate = Fraction(fps).limit_denominator(1001)
    for i, p in enumerate(paths):
        frames = _even_pad(to_uint8(video[i]).permute(1, 2, 3, 0).contiguous()).numpy()  # (F, H, W, 3)
        with atomic_path(p) as tmp:
            with av.open(str(tmp), mode="w", format="mp4") as container:
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height = frames.shape[2], frames.shape[1]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf)}
                astream = None
                if audio is not None:
                    channels = audio.shape[1]
                    astream = container.add_stream("aac", rate=int(sample_rate))
                    astream.layout = "mono" if channels == 1 else "stereo"
                for frame in frames:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
                if astream is not None:
                    samples = audio[i].detach().float().clamp(-1, 1).cpu()
                    samples = samples[:2] if samples.shape[0] > 1 else samples
                    aframe = av.AudioFrame.from_ndarray(
                        np.ascontiguousarray(samples.numpy()), format="fltp", layout=astream.layout.name)
                    aframe.sample_rate = int(sample_rate)
                    for packet in astream.encode(aframe):
                        container.mux(packet)
                    for packet in astream.encode():
                        container.mux(packet)
    return paths


def write_wav(output: Output, path: Path) -> list[Path]:
    """Audio ``(B, channels, samples)`` in [-1, 1] → 16-bit PCM WAV per batch item at
    ``output.sample_rate`` (48 kHz if unset)."""
    import wave

    audio, sample_rate = output.audio, output.sample_rate or 48000
    if audio is None or audio.dim() != 3:
        raise ValueError(f"WAV writer: expected audio (B, channels, samples), got {None if audio is None else tuple(audio.shape)}")
    paths = _batch_paths(path, audio.shape[0])
    for i, p in enumerate(paths):
        pcm = (audio[i].detach().float().clamp(-1, 1) * 32767).round().to(torch.int16).cpu()
        with atomic_path(p) as tmp:
            with wave.open(str(tmp), "wb") as f:
                f.setnchannels(pcm.shape[0])
                f.setsampwidth(2)
                f.setframerate(int(sample_rate))
                f.writeframes(pcm.t().contiguous().numpy().astype("<i2").tobytes())  # interleaved
    return paths


_WRITERS = {
    "image": (".png", write_png),
    "video": (".mp4", write_mp4),
    "video+audio": (".mp4", write_mp4),
    "audio": (".wav", write_wav),
}


def register_writer(kind: str, suffix: str, writer) -> None:
    """Let a plugin that produces a new output kind provide its writer: ``writer(output, path)``
    writes the :class:`Output` and returns the files written."""
    _WRITERS[kind] = (suffix, writer)


def write_output(output: Output, path: str | os.PathLike) -> list[Path]:
    """Write ``output`` to ``path`` in the format of its kind; returns the files written."""
    if output.kind not in _WRITERS:
        raise ValueError(f"no writer for {output.kind!r} outputs (known: {', '.join(sorted(_WRITERS))})")
    suffix, writer = _WRITERS[output.kind]
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise ValueError(f"{output.kind} outputs are written as {suffix} files, got {path}")
    return writer(output, path)
