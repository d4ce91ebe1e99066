"""The card and the versions a measurement depends on, recorded beside every figure
(``ditkit bench``, ``ditkit bench --load``, the GPU scripts)."""
from __future__ import annotations

import platform
from typing import Any

import torch

__all__ = ["environment"]


def environment(device: torch.device) -> dict[str, Any]:
    """The card and the versions the figures depend on."""
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                           "threads": torch.get_num_threads(), "device": str(device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - not installed on CPU machines
        env["triton"] = None
    if device.type == "cuda":
        env.update(card=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env
