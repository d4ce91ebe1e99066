"""The kit's pytest plugin (``pytest11`` entry point): options and a header naming what runs."""
from __future__ import annotations

import os
import platform


def pytest_addoption(parser):
    group = parser.getgroup("ditkit", "ditkit conformance kit")
    group.addoption("--ditkit-max-examples", type=int, default=2,
                    help="Hypothesis examples per shape property (compile and USP parity); default 2")
    group.addoption("--ditkit-usp-world", type=int, default=2, help="ranks for the USP parity check; default 2")
    group.addoption("--ditkit-strict", action="store_true", default=False,
                    help="reference-parity fails, rather than skips, when fidelity is unproven (no reference or its package missing)")


def pytest_report_header(config):
    import torch

    import core

    lines = [f"ditkit {core.__version__}, torch {torch.__version__}, python {platform.python_version()}"]
    try:
        from core.registry import get_registry

        for p in get_registry().plugins():
            lines.append(f"ditkit plugin {p.name}: {p.distribution} {p.version}, models: {', '.join(p.models) or '-'}")
    except Exception as exc:  # a header must never break the session
        lines.append(f"ditkit plugins: not loaded ({type(exc).__name__}: {exc})")
    env = {k: v for k, v in os.environ.items() if k.startswith("DITKIT_") or k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
    lines.append("ditkit environment: " + (", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "(none set)"))
    return lines
