"""What bounds a DiT step: its matmul and attention FLOPs over the measured rates of one card.

    python scripts/flop_floors.py [--matmul-tflops 699] [--attention-tflops 578]

Defaults are the rates measured on one H200 (torch 2.11, bf16): an 8192³ matmul at 699 TFLOP/s and
SDPA's cuDNN backend at ~578 TFLOP/s on these attention shapes. FLOPs count 2 per multiply-add:
projections and MLPs are the matmuls; attention is QKᵀ and PV (4·L²·D per layer for self-attention).
Norms, RoPE, modulation and the rest are taken as free, so the floor is optimistic.
"""
from __future__ import annotations

import argparse


def wan(tokens: int, dim: int, layers: int, ffn: int, text: int = 512) -> tuple[float, float]:
    proj = 8 * tokens * dim * dim + 4 * tokens * dim * dim + 4 * text * dim * dim  # self qkvo, cross q/o, cross k/v
    return layers * (proj + 4 * tokens * dim * ffn), layers * (4 * tokens * tokens * dim + 4 * tokens * text * dim)


def qwen_image(image: int, text: int, dim: int, layers: int, ffn: int) -> tuple[float, float]:
    joint = image + text  # both streams: their own projections and MLPs, one joint attention
    return layers * (8 * joint * dim * dim + 4 * joint * dim * ffn), layers * 4 * joint * joint * dim


CASES = {  # name: (matmul FLOPs, attention FLOPs, DiT forwards per step)
    "Wan2.1-1.3B, 832x480x81 (32,760 tokens)": (*wan(32760, 1536, 30, 8960), 1),
    "Qwen-Image, 1328x1328 (6,889 image + 128 text tokens)": (*qwen_image(6889, 128, 3072, 60, 12288), 1),
    "Wan2.1-14B, 480p 81 frames, CFG on": (*wan(32760, 5120, 40, 13824), 2),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matmul-tflops", type=float, default=699.0)
    parser.add_argument("--attention-tflops", type=float, default=578.0)
    args = parser.parse_args(argv)
    print(f"| case | matmul TFLOP | attention TFLOP | floor s/step at {args.matmul_tflops:g} / {args.attention_tflops:g} TFLOP/s |")
    print("|---|---|---|---|")
    for name, (mm, att, forwards) in CASES.items():
        floor = forwards * (mm / (args.matmul_tflops * 1e12) + att / (args.attention_tflops * 1e12))
        print(f"| {name} | {forwards * mm / 1e12:.1f} | {forwards * att / 1e12:.1f} | {floor:.3f} |")


if __name__ == "__main__":
    main()
