"""Sharded weights on every built-in model's tiny preset, by hand (the suite covers the example plugin).

On N gloo ranks (default 2), per model: the tiny pipeline with ``use_usp=True, shard_weights=True``
against the same USP layout unsharded (bit-identical expected) and against one process (the USP
tolerance, 1e-5 relative), on the kit's declared uneven call, plus the parameter bytes this rank
holds of each sharded component.

    python scripts/shard_weights_models.py [--nproc 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ["wan2.1-t2v-1.3b", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "qwen-image", "mova-360p"]


def worker(models: list[str]) -> dict:
    from core.testing import Subject
    from core.testing.checks import PROMPT, rel_error

    out = {}
    for name in models:
        subject = Subject(name)
        ref = subject.build()
        plain = subject.build(use_usp=True)
        sharded = subject.build(use_usp=True, shard_weights=True)
        args = subject.call_args(**(subject.spec.conformance.uneven_call or {}))
        sharded.parallel.clear_splits()
        got = sharded(PROMPT, **args).tensor()
        out[name] = {
            "vs unsharded (max abs)": (got - plain(PROMPT, **args).tensor()).abs().max().item(),
            "vs one process (rel)": rel_error(got, ref(PROMPT, **args).tensor()),
            "remainders": sorted({s["remainder"] for s in sharded.parallel.splits()}),
            "this rank / whole": {k: round(c.rank_bytes / c.total_bytes, 4)
                                  for k, c in sharded.parallel.weight_shards.components.items()},
        }
        plain.parallel.remove()
        sharded.parallel.remove()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("models", nargs="*", default=MODELS)
    args = parser.parse_args()
    from core.parallel import launch

    print(json.dumps(launch(worker, args.nproc, args=(args.models,), timeout=1800), indent=2))


if __name__ == "__main__":
    main()
