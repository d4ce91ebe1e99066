"""Run in a fresh process by the disk-offload memory test: load the 1 GiB test plugin from its fp32
checkpoint under ``offload="disk"`` computing in bfloat16 (so the factory's ``.to(bfloat16)`` and the
per-block cast are in the measured path), generate once, and print what the process held above its start."""
from __future__ import annotations

import json
import sys


def measure(root: str, mode: str | None = "disk") -> dict:
    from core.loading import load_spec
    from core.testing.memory import HostMemoryPeak

    from .big_plugin import spec

    with HostMemoryPeak() as peak:
        pipe = load_spec(spec, "tiny", weights=root, offload=mode, dtype="bfloat16")
        for block in pipe.dit.blocks:  # sampled while each block's compute copy exists
            block.register_forward_hook(lambda *a: peak.sample(), prepend=True)
        pipe("x", seed=0, progress=False)
    return {"mode": mode, "anon_bytes": peak.anon_bytes, "file_bytes": peak.file_bytes,
            "weights_bytes": sum(p.numel() * 4 for p in pipe.dit.parameters()),  # as stored: fp32
            "block_bytes": sum(p.numel() * 2 for p in pipe.dit.blocks[0].parameters()),  # a compute copy: bf16
            "units": len(pipe.offload.units) if pipe.offload else 0}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], None if sys.argv[2:] == ["none"] else "disk")))
