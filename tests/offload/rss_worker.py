"""Run in a fresh process by the disk-offload memory test: load the 1 GiB test plugin from its
checkpoint under ``offload="disk"``, generate once, and print what the process held above its start."""
from __future__ import annotations

import json
import sys


def measure(root: str, mode: str | None = "disk") -> dict:
    from core.loading import load_spec
    from core.testing.memory import HostMemoryPeak

    from .big_plugin import spec

    with HostMemoryPeak() as peak:
        pipe = load_spec(spec, "tiny", weights=root, offload=mode)
        for block in pipe.dit.blocks:  # sampled while each block's compute copy exists
            block.register_forward_hook(lambda *a: peak.sample(), prepend=True)
        pipe("x", seed=0, progress=False)
    return {"mode": mode, "anon_bytes": peak.anon_bytes, "file_bytes": peak.file_bytes,
            "weights_bytes": sum(p.numel() * 4 for p in pipe.dit.parameters()),
            "block_bytes": sum(p.numel() * 4 for p in pipe.dit.blocks[0].parameters()),
            "units": len(pipe.offload.units) if pipe.offload else 0}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], None if sys.argv[2:] == ["none"] else "disk")))
