"""Weight bytes on the device per offload mode, for each model's real configuration: the estimate
``offload="auto"`` and the "does not fit" errors use (``core.offload.needed_bytes``), computed from
the pipelines built on the meta device (nothing is allocated).

    python scripts/offload_estimates.py                 # the markdown table of docs/PERFORMANCE.md
    python scripts/offload_estimates.py --json FILE

Per preset (bf16 on CUDA): the weights' total, then per mode the bytes on the device and the host
memory the offloaded copies take (pinned). ``model`` is the largest component (components called
inside another's call, such as MOVA's towers and bridge, add up: a lower bound); ``block`` and
``disk`` hold the resident parameters plus two groups (the running one and the prefetched one).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b", "qwen-image",
          "mova-360p", "mova-720p")


def estimates(dtype=torch.bfloat16, device="cuda") -> list[dict]:
    import core
    from core import offload as offloading
    from core.loading import _attach

    rows = []
    for name in MODELS:
        spec = core.get_registry().model(name).spec
        preset = spec.presets["official"]
        with torch.device("meta"):
            pipe = spec.pipeline(dict(preset.config), device=torch.device("meta"), dtype=dtype, weights=None)
        _attach(pipe, spec, preset)
        fp = offloading.footprint(pipe)
        row = {"model": name, "weights": fp.total, "components": fp.components, "blocks": fp.blocks, "group": fp.group,
               "modes": {}}
        for mode in (None, *offloading.MODES):
            dev, host = offloading.needed_bytes(fp, mode, device)
            row["modes"][str(mode)] = {"device": dev, "host": host}
        rows.append(row)
    return rows


def table(rows) -> str:
    gb = 1e9
    lines = ["| preset (official config, bf16) | weights | resident | model | block | disk |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        modes = r["modes"]
        cells = [f"{modes[m]['device'] / gb:.1f}" + (f" (+{modes[m]['host'] / gb:.1f} host)" if modes[m]["host"] else "")
                 for m in ("None", "model", "block", "disk")]
        lines.append(f"| {r['model']} | {r['weights'] / gb:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    rows = estimates()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
