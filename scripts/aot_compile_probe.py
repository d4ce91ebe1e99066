"""Probe: ahead-of-time compilation of one Wan block (``torch.compile(...).aot_compile``, experimental).

    python scripts/aot_compile_probe.py save /tmp/block.aot   # compile once (dynamic length), save
    python scripts/aot_compile_probe.py aot  /tmp/block.aot   # fresh process: load, first call
    python scripts/aot_compile_probe.py jit                   # fresh process: torch.compile, first call

Prints the first-call time (compilation or loading included) and the max difference to eager at a
token count the saved artifact was not traced at. docs/PERFORMANCE.md records what it showed.
"""
from __future__ import annotations

import sys
import time

import torch

from plugins.wan.dit import WanAttentionBlock, WanDiTConfig, WanModel


def _inputs(frames: int):
    torch.manual_seed(0)
    cfg = WanDiTConfig.tiny("t2v", dim=512, ffn_dim=2048, num_heads=4, num_layers=1)
    model = WanModel(cfg).eval().requires_grad_(False)
    x = torch.randn(1, frames * 12 * 10, 512)
    rope = model.rope(torch.randn(1, 16, frames, 24, 20))
    return model.blocks[0], x, torch.randn(1, 1, 6, 512), torch.randn(1, 512, 512), rope


def main(mode: str, path: str | None = None) -> None:
    start = time.perf_counter()
    with torch.inference_mode():  # the pipeline's mode: the artifact guards on it
        if mode == "save":
            block, x, e0, ctx, rope = _inputs(2)
            torch._dynamo.mark_dynamic(x, 1)
            torch._dynamo.mark_dynamic(rope, 1)
            fn = torch.compile(WanAttentionBlock.forward, fullgraph=True).aot_compile(((block, x, e0, ctx, rope), {}))
            fn.save_compiled_function(path)
            print(f"save: compiled and saved in {time.perf_counter() - start:.2f} s")
            return
        args = _inputs(3)
        if mode == "aot":
            with open(path, "rb") as f:
                fn = torch.compiler.load_compiled_function(f)
        else:
            fn = torch.compile(WanAttentionBlock.forward, dynamic=True, fullgraph=True)
        out = fn(*args)
        seconds = time.perf_counter() - start
        err = (out - WanAttentionBlock.forward(*args)).abs().max().item()
    print(f"{mode}: first call {seconds:.2f} s, max |compiled - eager| {err:.2e} at {args[1].shape[1]} tokens")


if __name__ == "__main__":
    main(*sys.argv[1:])
