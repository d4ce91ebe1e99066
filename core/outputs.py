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

__all__ = ["Output", "write_output", "atomic_path", "to_uint8"]


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
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_png(images: torch.Tensor, path: Path) -> list[Path]:
    from PIL import Image

    paths = [path] if images.shape[0] == 1 else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(images.shape[0])]
    for img, p in zip(to_uint8(images), paths):
        with atomic_path(p) as tmp:
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    return paths


_WRITERS = {"image": (".png", write_png)}


def register_writer(kind: str, suffix: str, writer) -> None:
    """Let a plugin that produces a new output kind provide its writer."""
    _WRITERS[kind] = (suffix, writer)


def write_output(output: Output, path: str | os.PathLike) -> list[Path]:
    """Write ``output`` to ``path`` in the format of its kind; returns the files written."""
    if output.kind not in _WRITERS:
        raise ValueError(f"no writer for {output.kind!r} outputs (known: {', '.join(sorted(_WRITERS))})")
    suffix, writer = _WRITERS[output.kind]
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise ValueError(f"{output.kind} outputs are written as {suffix} files, got {path}")
    return writer(output.tensor() if output.kind != "video+audio" else output, path)
