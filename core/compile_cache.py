"""Portable compile-cache bundles: what a warmed-up process compiled, carried to the next one.

``compile_pipeline(cache_dir=DIR)`` loads the bundle whose key matches this process (torch and
triton versions, device, model, preset config, dtype, compile options and parallel layout) with
``torch.compiler.load_cache_artifacts``, which pre-fills inductor's, AOTAutograd's and (on GPU)
Triton's caches. :meth:`Pipeline.save_compile_cache` writes one with
``torch.compiler.save_cache_artifacts`` — call it **after** generating at every size you will use:
a bundle holds only what was compiled before it was saved. A bundle of another key is never
loaded; inside a bundle, entries are content-addressed by graph and shapes, so one that does not
fit a call is simply unused. Dynamo still traces every graph in the new process.

Caches never stop a run: a folder that cannot be written (read-only, a file in the way) and a
bundle that cannot be read (truncated, empty, garbage) are each one :class:`CompileCacheWarning`,
and the run goes on without them (an unreadable bundle is rewritten by the next save).
:func:`check_compile_caches` checks every cache path before any work (``ditkit run``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["CompileCacheWarning", "persistent_cache_dir", "bundle_key", "bundle_path", "load_bundle", "save_bundle", "open_bundle",
           "unwritable_reason", "check_compile_caches"]


class CompileCacheWarning(UserWarning):
    """A compile cache that cannot be written or read; the run goes on without it."""


def unwritable_reason(folder: str | os.PathLike) -> str | None:
    """Why no cache file can be written in ``folder`` (it is a file, a file is in its path, it is
    not writable), or ``None`` when one can: the folder is created (``mkdir -p``) and a probe file
    written and removed, the only test that sees read-only mounts and ACLs."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{str(existing)!r} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ditkit-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def bundle_key(pipe, options: dict) -> dict:
    """Everything a compiled artifact depends on, as plain data."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - not installed on CPU machines
        triton_version = None
    device = pipe.device
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    spec = pipe.spec
    mesh = getattr(pipe.parallel, "mesh", None)
    layout = None if mesh is None else [mesh.world_size, mesh.ulysses_degree, mesh.ring_degree, mesh.cfg_degree]
    config = json.dumps(getattr(pipe, "preset_config", None), sort_keys=True, default=str)
    return {"torch": torch.__version__, "triton": triton_version, "device": card, "model": spec.name if spec else None,
            "config": hashlib.sha256(config.encode()).hexdigest()[:16], "dtype": str(pipe.dtype),
            "options": {k: repr(v) for k, v in sorted(options.items())}, "parallel": layout}


def bundle_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{key['model'] or 'pipeline'}-{digest}.compile-cache"


@contextlib.contextmanager
def _torch_cache_log_silenced():
    """torch logs a traceback for a bundle it cannot un-pickle; ditkit reports it in one line."""
    log = logging.getLogger("torch.compiler._cache")
    previous, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = previous


def load_bundle(path: Path) -> str:
    """Load the bundle at ``path``: ``"loaded"``, ``"absent"`` (no file) or ``"unreadable"``
    (empty, truncated or not a bundle; nothing was loaded)."""
    if not path.is_file():
        return "absent"
    try:
        data = path.read_bytes()
    except OSError:
        return "unreadable"
    if not data:
        return "unreadable"
    with _torch_cache_log_silenced():
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception:  # noqa: BLE001 - whatever torch makes of foreign bytes, the bundle is unusable
            return "unreadable"
    return "loaded" if info is not None else "unreadable"


def open_bundle(pipe, cache_dir: str | os.PathLike, options: dict, components: list[str]) -> tuple[Path, dict, str]:
    """The bundle of ``pipe`` compiled with ``options`` in ``cache_dir``, loaded when it exists:
    ``(path, key, status of load_bundle)``; an unreadable one is a :class:`CompileCacheWarning`."""
    key = {**bundle_key(pipe, options), "components": sorted(components)}
    path = bundle_path(cache_dir, key)
    status = load_bundle(path)
    if status == "unreadable":
        warnings.warn(f"compile cache {str(path)!r} is unreadable (empty, truncated or not a bundle) and was "
                      f"ignored; save_compile_cache() rewrites it", CompileCacheWarning, stacklevel=3)
    return path, key, status


def save_bundle(path: Path, key: dict) -> Path | None:
    """Write what this process compiled so far to ``path`` (atomically, with its key beside it);
    ``None`` when nothing was compiled."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(saved[0])
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(key, indent=2, sort_keys=True))
    return path


def check_compile_caches(bundle_dir: str | os.PathLike | None) -> str | None:
    """Every compile cache a compiling run writes, checked before any work: the persistent kernel
    cache (``DITKIT_COMPILE_CACHE`` or its default; see :func:`persistent_cache_dir`,
    which turns one it cannot write off for the process, so it is reported once) and the bundle
    folder. Each that cannot be written is one :class:`CompileCacheWarning`. Returns ``bundle_dir``,
    or ``None`` when it cannot be written (compile without a bundle)."""
    persistent_cache_dir()
    if bundle_dir is None:
        return None
    problem = unwritable_reason(bundle_dir)
    if problem:
        warnings.warn(f"--compile-cache {str(bundle_dir)!r} cannot be written ({problem}); compiling without a "
                      f"portable bundle", CompileCacheWarning, stacklevel=2)
        return None
    return str(bundle_dir)


def persistent_cache_dir() -> str | None:
    """Point inductor's on-disk cache (compiled kernels, FX graphs, AOTAutograd) at a directory that
    outlives the process, keyed by torch version, unless the user chose one.

    PyTorch's default lives under the temp directory (``/tmp/torchinductor_<user>``), which is
    emptied on reboot and on many clusters per job; the cold first call then pays every kernel build
    again. ``DITKIT_COMPILE_CACHE`` overrides the base directory (``off`` keeps PyTorch's default);
    ``TORCHINDUCTOR_CACHE_DIR``, when set, always wins. Returns the directory in use (``None``
    when left to PyTorch). A directory that cannot be written is one
    :class:`CompileCacheWarning` and is then off for the process.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # inductor writes its default into the variable the first time it looks it up, so only a
    # different value is the user's choice
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return chosen
    base = os.environ.get("DITKIT_COMPILE_CACHE")
    if base is not None and base.strip().lower() in {"off", "0", "none", ""}:
        return None
    if base is None:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "ditkit")
    path = os.path.join(base, "inductor", f"torch-{torch.__version__}")
    problem = unwritable_reason(path)
    if problem:  # a warning, once: the run goes on with PyTorch's default
        source = "DITKIT_COMPILE_CACHE" if "DITKIT_COMPILE_CACHE" in os.environ else "the default compile cache"
        warnings.warn(f"{source} {base!r} cannot be written ({problem}); compiled kernels are not kept across "
                      f"processes (DITKIT_COMPILE_CACHE=off for the rest of this run)", CompileCacheWarning, stacklevel=2)
        os.environ["DITKIT_COMPILE_CACHE"] = "off"
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path
