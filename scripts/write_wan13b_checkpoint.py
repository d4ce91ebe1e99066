"""Write a real-size Wan2.1-T2V-1.3B checkpoint folder in the official layout, bf16, random weights.

The folder is what ``core.load("wan2.1-t2v-1.3b", preset="official", weights=DIR)`` reads: the DiT
(1.419 B parameters, bf16 safetensors with its index), umT5-XXL (5.681 B, ``.pth`` in bf16, as
published), the VAE (``Wan2.1_VAE.pth``, float32 as published) and a tokenizer folder. It is
written by the plugin's own checkpoint writer (``plugins.wan.plugin.write_checkpoint``) from a
pipeline built on the meta device and materialised straight in its final dtypes (the factory's
float32 build of umT5-XXL alone would take 23 GB), with seeded values: N(0, 0.02) for matrices,
1 for norm scales, 0 for biases. About 14.7 GB on disk and in memory while writing; the
tokenizer is the tiny stand-in (no network here: the real ``google/umt5-xxl`` SentencePiece model
cannot be fetched), whose ids all fall inside umT5's vocabulary.

    python scripts/write_wan13b_checkpoint.py /path/to/Wan2.1-T2V-1.3B-random
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def materialise(module: torch.nn.Module, seed: int) -> None:
    """Allocate ``module``'s meta tensors on the CPU in their dtypes and fill them, tensor by tensor."""
    module.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                t.zero_()
            elif t.dim() == 1 and name.endswith("bias"):
                t.zero_()
            elif t.dim() == 1:
                t.fill_(1.0)
            else:
                _fill_in_rows(t, g)


def _fill_in_rows(t: torch.Tensor, g: torch.Generator) -> None:
    """N(0, 0.02) drawn in float32 a few million values at a time (no float32 copy of a whole matrix)."""
    rows = t.view(t.shape[0], -1)
    step = max(1, (1 << 22) // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        rows[i:i + step].copy_(torch.randn(rows[i:i + step].shape, generator=g).mul_(0.02))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="official", help="another preset's shapes (tiny: a quick dry run)")
    args = parser.parse_args()

    import core
    from plugins.wan.plugin import write_checkpoint

    spec = core.get_registry().model("wan2.1-t2v-1.3b").spec
    config = dict(spec.presets[args.preset].config)
    start = time.perf_counter()
    with torch.device("meta"):
        pipe = spec.pipeline(config, device=torch.device("meta"), dtype=torch.bfloat16, weights=None)
    for seed, (name, module) in enumerate(sorted(pipe.components().items())):
        materialise(module, seed)
        print(f"{name}: {sum(p.numel() for p in module.parameters()) / 1e9:.3f} B parameters, "
              f"{next(module.parameters()).dtype}", flush=True)
    built = time.perf_counter() - start
    write_checkpoint(pipe, args.out, shards=1, t5_dtype=torch.bfloat16)
    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    report = {"seconds_build": round(built, 1), "seconds_write": round(time.perf_counter() - start - built, 1),
              "bytes": sum(p.stat().st_size for p in files),
              "files": {str(p.relative_to(args.out)): p.stat().st_size for p in files}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
