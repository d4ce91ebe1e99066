"""What a pipeline returns, and writers for the formats people open (PNG; MP4 and WAV below).

Files are written to a temporary name in the target folder (``.<name>.<pid>.<random><suffix>``)
and renamed into place, so an interrupted run never leaves a half-written file and the previous
file at that path survives a failed write (disk full). The temporary is removed on any exception,
Ctrl-C and (through the CLI's handler) SIGTERM; one left by a process killed outright (SIGKILL) is
removed by the next write to the same path, once its pid is gone. :func:`check_output_path`
runs every check that needs no data (suffix for the output kind, a directory in the way, the
folder writable) so the CLI fails before any work. Encoders run single-threaded with fixed
options and fixed container metadata, and the MP4 encoder with fixed fresh heap contents
(:mod:`core.heap_fill`, glibc): the same tensors give the same bytes, in any process.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import OutputError
from .heap_fill import fixed_heap_fill

__all__ = ["check_output_path", "Output", "write_output", "register_writer", "atomic_path", "to_uint8", "write_png", "write_mp4", "write_wav"]


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove temporaries of ``target`` (``.<name>.<pid>.<random><suffix>``) whose writer is gone;
    a live writer's temporary (a concurrent run) is left alone. Returns what was removed."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(\d+)\.[^.]+" + re.escape(target.suffix) + "$")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def _write_failed(target: Path, exc: OSError) -> OutputError:
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "the file is larger than allowed", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}.get(exc.errno, exc.strerror or str(exc))
    kept = " (the previous file there is unchanged)" if target.exists() else ""
    return OutputError(f"cannot write {target}: {what}{kept}")


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary goes on any exception (and on Ctrl-C); an ``OSError`` (disk full, read-only)
    becomes one :class:`OutputError` line, the previous file at ``path`` intact."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=suffix or target.suffix, dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_failed(target, exc) from exc
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a written result is an ordinary file
        os.replace(tmp, target)
    except OSError as exc:
        raise _write_failed(target, exc) from exc
    except Exception as exc:
        # encoders (PyAV) wrap the OS error in their own type; its errno still says what happened
        code = getattr(exc, "errno", None)
        if isinstance(code, int) and code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES):
            raise _write_failed(target, OSError(code, os.strerror(code))) from exc
        raise
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
        raise OutputError(f"PNG writer: expected images (B, 3, H, W), got {None if images is None else tuple(images.shape)}")
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
        raise OutputError(f"MP4 writer: expected video (B, 3, F, H, W), got {None if video is None else tuple(video.shape)}")
    paths = _batch_paths(path, video.shape[0])
    rate = Fraction(fps).limit_denominator(1001)
    for i, p in enumerate(paths):
        frames = _even_pad(to_uint8(video[i]).permute(1, 2, 3, 0).contiguous()).numpy()  # (F, H, W, 3)
        # fixed heap contents: x264 reads memory it never wrote on some inputs (core.heap_fill)
        with atomic_path(p) as tmp, fixed_heap_fill():
            # bitexact: no encoder version strings or wall-clock fields in the file, deterministic coding
            with av.open(str(tmp), mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height = frames.shape[2], frames.shape[1]
                stream.pix_fmt = "yuv420p"
                # one thread and fixed options: x264's threaded encoding depends on timing, so the
                # same frames gave different files run to run
                stream.thread_count = 1
                stream.thread_type = "NONE"
                stream.options = {"crf": str(crf), "threads": "1", "x264-params": "threads=1:lookahead-threads=1",
                                  "flags": "+bitexact"}
                astream = None
                if audio is not None:
                    channels = audio.shape[1]
                    astream = container.add_stream("aac", rate=int(sample_rate))
                    astream.thread_count = 1
                    astream.options = {"flags": "+bitexact"}
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
        raise OutputError(f"WAV writer: expected audio (B, channels, samples), got {None if audio is None else tuple(audio.shape)}")
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


def _kind_suffix(kind: str) -> str:
    if kind not in _WRITERS:
        raise OutputError(f"no writer for {kind!r} outputs (known: {', '.join(sorted(_WRITERS))})")
    return _WRITERS[kind][0]


def default_output_name(model: str, kind: str) -> str:
    """``<model>.<suffix of the kind>``: where ``ditkit run`` writes without ``--out``."""
    return f"{model}{_kind_suffix(kind)}"


def check_output_path(path: str | os.PathLike, kind: str) -> Path:
    """Everything about writing ``kind`` to ``path`` that can be known before generating: the
    suffix matches the kind, ``path`` is not a directory, its parent is (or can be made) a
    directory, and a file can be created there. :class:`OutputError` otherwise."""
    suffix = _kind_suffix(kind)
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"output path {str(target)!r} is a directory; name a {suffix} file")
    if target.suffix.lower() != suffix:
        raise OutputError(f"{kind} outputs are written as {suffix} files, got {str(target)!r}")
    folder = target.parent
    existing = folder
    while not existing.exists():  # the first existing ancestor decides (mkdir -p later)
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise OutputError(f"cannot write {str(target)!r}: {str(existing)!r} is a file, not a directory")
    if existing == folder:
        try:  # create and remove a probe: the only test that sees ACLs, read-only mounts and immutable bits
            fd, probe = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".probe", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise _write_failed(target, exc) from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {str(target)!r}: cannot create folders in {str(existing)!r} (permission denied)")
    return target


def write_output(output: Output, path: str | os.PathLike) -> list[Path]:
    """Write ``output`` to ``path`` in the format of its kind; returns the files written.
    Non-finite values are refused (:class:`OutputError`): a file of NaNs is never written."""
    target = check_output_path(path, output.kind)
    _, writer = _WRITERS[output.kind]
    for name in ("images", "video", "audio"):
        value = getattr(output, name)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise OutputError(f"{output.kind} output holds non-finite {name} (NaN or inf); {target} was not written")
    return writer(output, target)
