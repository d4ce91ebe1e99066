"""Portable compile-cache bundles: what a warmed-up process compiled, carried to the next one.

``compile_pipeline(cache_dir=DIR)`` loads the bundle whose key matches this process (torch and
triton versions, device, model, preset config, dtype, compile options and parallel layout) with
``torch.compiler.load_cache_artifacts``, which pre-fills inductor's, AOTAutograd's and (on GPU)
Triton's caches. :meth:`Pipeline.save_compile_cache` writes one with
``torch.compiler.save_cache_artifacts`` — call it **after** generating at every size you will use:
a bundle holds only what was compiled before it was saved. A bundle of another key is never
loaded; inside a bundle, entries are content-addressed by graph and shapes, so one that does not
fit a call is simply unused. Dynamo still traces every graph in the new process.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["bundle_key", "bundle_path", "load_bundle", "save_bundle"]


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


def load_bundle(path: Path) -> bool:
    """Load the bundle at ``path`` if it exists; True when it did."""
    if not path.is_file():
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    return True


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
