"""The error of fp8 weight storage (``weight_dtype="float8_e4m3fn"``) against bf16, on the tiny presets.

For each built-in model, the tiny preset (seeded random weights) is built twice in bf16 on the
CPU, once with linear weights stored in fp8, and one generation is run on each with the same seed
and arguments (the preset's defaults, 2 steps). Reported per model: the parameter bytes of every
component in both, and the relative error (‖fp8 − bf16‖ / ‖bf16 − mean(bf16)‖, the kit's metric)
of the DiT's first velocity and of the output. Random tiny weights are not trained ones: the
figures show the mechanism's order of magnitude, not the quality loss on a released model.

    python scripts/fp8_error.py [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ["wan2.1-t2v-1.3b", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "qwen-image", "mova-360p"]


def run(name: str) -> dict:
    import core
    from core.sizes import component_sizes
    from core.testing import Subject
    from core.testing.checks import rel_error

    subject = Subject(name)
    outputs, sizes = {}, {}
    for label, weight_dtype in (("bf16", None), ("fp8", "float8_e4m3fn")):
        pipe = core.load(name, device="cpu", dtype="bfloat16", weight_dtype=weight_dtype)
        sizes[label] = {k: v["bytes"] for k, v in component_sizes(pipe).items()}
        args = subject.call_args(num_inference_steps=2, seed=0)
        with pipe.tracing() as trace:
            out = pipe("a lighthouse on a cliff at dusk", **args)
        outputs[label] = {"velocity": trace["velocity"].float(), "output": out.tensor().float()}
    return {
        "bytes_bf16": sizes["bf16"], "bytes_fp8": sizes["fp8"],
        "velocity_error": rel_error(outputs["fp8"]["velocity"], outputs["bf16"]["velocity"]),
        "output_error": rel_error(outputs["fp8"]["output"], outputs["bf16"]["output"]),
        "output_max_abs": (outputs["fp8"]["output"] - outputs["bf16"]["output"]).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report = {"torch": torch.__version__, "models": {}}
    for name in MODELS:
        r = report["models"][name] = run(name)
        import core

        dit = core.get_registry().model(name).spec.compilable_models[0]
        total = sum(r["bytes_fp8"].values()) / sum(r["bytes_bf16"].values())
        print(f"{name:18} all components {total:.2f}x; {dit}: {r['bytes_bf16'][dit] / 1e6:.2f} MB bf16 -> "
              f"{r['bytes_fp8'][dit] / 1e6:.2f} MB fp8 ({r['bytes_fp8'][dit] / r['bytes_bf16'][dit]:.2f}x); "
              f"velocity error {r['velocity_error']:.3g}, output error {r['output_error']:.3g} "
              f"(max |diff| {r['output_max_abs']:.3g} on [0, 1])", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
