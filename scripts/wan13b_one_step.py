"""Wan2.1-T2V-1.3B at its real config on the CPU: load the official-layout folder, run one step.

Loads ``scripts/write_wan13b_checkpoint.py``'s folder through ``core.load`` (preset ``official``,
bf16, CPU), then generates one denoising step at a small size with the official guidance (CFG 5,
so two DiT calls and two umT5 encodings of 512 tokens). Prints JSON: load seconds and peak RSS
above the process's own before loading, the weights' bytes, the time in umT5, the DiT and the
rest (VAE decode), the output's shape and whether it is finite.

    OMP_NUM_THREADS=2 python scripts/wan13b_one_step.py /path/to/Wan2.1-T2V-1.3B-random
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class _Clock:
    """Seconds spent inside a module's forward, summed over calls."""

    def __init__(self, module):
        self.seconds, self.calls, self._t = 0.0, 0, None
        module.register_forward_pre_hook(lambda m, a: setattr(self, "_t", time.perf_counter()))
        module.register_forward_hook(lambda m, a, o: self._stop())

    def _stop(self):
        self.seconds += time.perf_counter() - self._t
        self.calls += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--num-frames", type=int, default=5)
    parser.add_argument("--preset", default="official", help="tiny: a dry run on the writer's --preset tiny folder")
    args = parser.parse_args()

    import core
    from plugins.wan import pipeline as _  # noqa: F401 - the plugin's imports before the baseline

    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS from here on
    start = time.perf_counter()
    pipe = core.load("wan2.1-t2v-1.3b", preset=args.preset, weights=args.weights, device="cpu", dtype="bfloat16")
    load_s = time.perf_counter() - start
    load_peak = _status("VmHWM") - base
    weights = sum(t.numel() * t.element_size() for m in pipe.components().values()
                  for t in {id(t): t for t in m.state_dict(keep_vars=True).values()}.values())
    clocks = {"text_encoder": _Clock(pipe.text_encoder), "dit": _Clock(pipe.dit)}
    start = time.perf_counter()
    out = pipe("a red fox running through fresh snow", num_inference_steps=1, height=args.height, width=args.width,
               num_frames=args.num_frames, seed=0, progress=False)
    total = time.perf_counter() - start
    s = pipe.vae.spatial_stride * pipe.patch[1]
    tokens = ((args.num_frames - 1) // pipe.vae.temporal_stride + 1) * (args.height // s) * (args.width // s)
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in pipe.components().items()},
        "weights_bytes": weights, "load_s": round(load_s, 1), "load_peak_rss_increase_bytes": load_peak,
        "load_peak_rss_vs_weights": round(load_peak / weights, 3), "reader": pipe.load_stats.as_dict(),
        "call": {"height": args.height, "width": args.width, "num_frames": args.num_frames, "num_inference_steps": 1,
                 "guidance_scale": pipe.preset_defaults["guidance_scale"], "dit_tokens": tokens},
        "umt5_s": round(clocks["text_encoder"].seconds, 1), "umt5_calls": clocks["text_encoder"].calls,
        "dit_s": round(clocks["dit"].seconds, 2), "dit_calls": clocks["dit"].calls,
        "rest_s": round(total - clocks["text_encoder"].seconds - clocks["dit"].seconds, 2), "total_s": round(total, 1),
        "output": list(out.video.shape), "finite": bool(torch.isfinite(out.video).all()),
        "peak_rss_increase_bytes": _status("VmHWM") - base,
    }, indent=2))


if __name__ == "__main__":
    main()
