"""Checks shared by every pipeline, so each plugin inherits them through the core.

The pipeline base calls these from ``check_inputs`` (before any work) and ``__call__`` (on what
``generate`` returned); ``core.load`` calls :func:`resolve_device`. They raise the project's error
types with one line naming the argument, the value and what was expected.
"""
from __future__ import annotations

import math
import numbers
import os
import resource
from typing import Any, Mapping

import torch

from .errors import GenerationError, InputError, PluginError

__all__ = [
    "MAX_INFERENCE_STEPS", "SEED_RANGE", "check_finite_args", "check_seed", "available_bytes", "check_fits",
    "format_bytes", "check_output_tensors", "resolve_device",
]

MAX_INFERENCE_STEPS = 10_000
"""Upper bound on ``num_inference_steps``: far above any sampler in use (4..1000), far below a
count whose σ table alone would not fit in memory."""

SEED_RANGE = (-(2**63), 2**64 - 1)
"""What ``torch.Generator.manual_seed`` accepts (signed or unsigned 64-bit)."""


def check_finite_args(args: Mapping[str, Any]) -> None:
    """Every float argument is finite; every tensor or image argument is non-empty (and a
    floating tensor finite). Runs over all arguments, so a plugin's own float options
    (``shift``, a second guidance scale) are covered without code of its own."""
    for key, value in args.items():
        if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() == 0:
                raise InputError(f"{key} is an empty tensor of shape {tuple(value.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise InputError(f"{key} holds non-finite values (NaN or inf)")
            continue
        size = getattr(value, "size", None)
        if hasattr(value, "convert") and isinstance(size, tuple):  # a PIL image
            if 0 in size:
                raise InputError(f"{key} is an empty image of size {size}")
            continue
        if isinstance(value, numbers.Real) and not math.isfinite(float(value)):  # float, numpy floats
            raise InputError(f"{key} must be a finite number, got {value!r}")


def check_seed(seed: Any) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"seed must be an integer, got {seed!r}")
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise InputError(f"seed must lie in [-2**63, 2**64 - 1] (a 64-bit seed), got {seed!r}")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_left() -> int | None:
    """Room left under ``RLIMIT_AS`` (a job scheduler's or ``ulimit -v`` memory cap), if one is set."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    used = int(line.split()[1]) * 1024
    except OSError:
        pass
    return max(0, soft - used)


def available_bytes(device: torch.device) -> int | None:
    """Memory a generation on ``device`` can still take: free GPU memory on CUDA; on the CPU the
    smaller of the kernel's ``MemAvailable`` and the room under ``RLIMIT_AS``. ``None`` when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no driver answer means "unknown", not an error
            return None
    if device.type == "meta":
        return None
    known = [v for v in (_meminfo_available(), _address_space_left()) if v is not None]
    return min(known) if known else None


def check_fits(estimated: int, device: torch.device, what: str, hint: str = "") -> None:
    """:class:`InputError` when ``estimated`` bytes (a lower bound of the generation's peak) exceed
    what ``device`` has; ``what`` names the request (``"1x16384x16384, 1 frame"``); ``hint`` is
    the advice the message ends with (:func:`core.offload.fit_hint` names an offload mode)."""
    free = available_bytes(device)
    if free is not None and estimated > free:
        raise InputError(
            f"{what} needs at least {format_bytes(estimated)} on {device}, but only {format_bytes(free)} "
            f"is available; {hint or 'use a smaller size (or tiled decoding where the model has it)'}"
        )


def check_output_tensors(output, *, plugin: str, model: str, step_hint: str = "") -> None:
    """What ``generate`` returned is an :class:`core.outputs.Output` whose tensors are finite."""
    from .outputs import Output

    if not isinstance(output, Output):
        raise PluginError(
            f"plugin {plugin!r}, model {model!r}: generate() must return a core.Output, got {type(output).__name__}"
        )
    for name in ("images", "video", "audio"):
        value = getattr(output, name)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise GenerationError(
                f"model {model!r} produced non-finite {name} (NaN or inf){step_hint}; nothing was written "
                f"(try float32 or bfloat16 instead of float16, or check the checkpoint)"
            )


def resolve_device(device) -> torch.device:
    """``None`` → CUDA if available, else CPU; a string or ``torch.device`` is parsed and checked
    against what this torch build and machine have (:class:`InputError` otherwise)."""
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r} is not a torch device (use 'cpu', 'cuda' or 'cuda:N')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA GPU"
            raise InputError(f"device {device!r} asked for CUDA, but this is {build}; use device='cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(f"device {device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif dev.type not in ("cpu", "meta"):
        available = {"mps": lambda: torch.backends.mps.is_available(), "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}
        probe = available.get(dev.type)
        if probe is None or not probe():
            raise InputError(f"device {device!r} is not available here; use 'cpu' or 'cuda'")
    return dev
