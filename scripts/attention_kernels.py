"""Attention kernels per DiT shape: exact first, then timed, the fastest exact one chosen.

    python scripts/attention_kernels.py --json attention.json              # CUDA, bf16, real shapes
    python scripts/attention_kernels.py --device cpu --tiny --json a.json  # the same at tiny shapes (CI)

Candidates are every registered kernel (``core.attention.available_kernels()`` after the plugin
registry has loaded, so ``fa4`` from ``plugins/kernels`` is among them where ``flash-attn-4``
imports) except ``sdpa-math``, which is the reference. For each shape, on one set of random
inputs in ``--dtype``:

1. the reference is SDPA's math backend in float32 on the same inputs upcast (computed in query
   chunks, so a 32,760-token shape never holds its whole score matrix);
2. each kernel runs once; a kernel that raises is ``unavailable`` (SDPA's cuDNN and
   memory-efficient backends have no CPU kernel), one whose output is not finite or whose
   ‖out − ref‖ / ‖ref‖ exceeds the tolerance is ``inexact`` and is **never timed or chosen**;
3. each exact kernel is timed (CUDA events on a GPU, ``perf_counter`` on a CPU) over ``--reps``
   calls after two warm-up calls: median, min and max, and TFLOP/s at 4·B·H·Lq·Lk·D;
4. ``chosen`` is the exact kernel with the lowest median.

Tolerances (relative): float32 1e-4 (accumulation order, no TF32), float16 2e-3, bfloat16 1e-2
(inputs and output carry 8 bits of mantissa: the output's rounding alone is ~2e-3; an FP8 kernel,
3 bits, lands near 3e-2 and fails).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
REFERENCE = "sdpa-math"

# name: (batch, heads, query tokens, key tokens, head dim)
SHAPES = {
    "wan1.3b-self-832x480x81": (1, 12, 32760, 32760, 128),
    "wan1.3b-cross": (1, 12, 32760, 512, 128),
    "wan14b-self-832x480x81": (1, 40, 32760, 32760, 128),
    "qwen-image-joint-1328": (1, 24, 7017, 7017, 128),  # 6,889 image + 128 text tokens
}
TINY_SHAPES = {
    "self-uneven": (1, 2, 37, 37, 16),
    "cross": (1, 2, 37, 11, 16),
    "joint": (2, 3, 29, 29, 32),
}


def flops(shape) -> float:
    b, h, lq, lk, d = shape
    return 4.0 * b * h * lq * lk * d


def reference(q, k, v, chunk_bytes: int = 2**30) -> torch.Tensor:
    """SDPA math in float32 over query chunks: ``(B, H, Lq, D)`` float32."""
    q, k, v = q.float(), k.float(), v.float()
    b, h, lq, _ = q.shape
    rows = max(1, chunk_bytes // (4 * b * h * k.shape[2]))
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    with sdpa_kernel([SDPBackend.MATH]):
        for i in range(0, lq, rows):
            out[:, :, i:i + rows] = F.scaled_dot_product_attention(q[:, :, i:i + rows], k, v)
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = ((out.float() - ref).norm() / ref.norm()).item()
    return err if err == err else float("inf")  # NaN never passes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_kernel(kernel, q, k, v, reps: int) -> list[float]:
    """Seconds per call, ``reps`` calls after two warm-up calls."""
    device = q.device
    for _ in range(2):
        kernel(q, k, v, mask=None, scale=None)
    _synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            kernel(q, k, v, mask=None, scale=None)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t = time.perf_counter()
            kernel(q, k, v, mask=None, scale=None)
            times.append(time.perf_counter() - t)
    return times


def compare_shape(name: str, shape, kernels: dict, device: torch.device, dtype: torch.dtype, reps: int,
                  seed: int = 0) -> dict:
    """One shape: every kernel checked against the float32 reference, the exact ones timed."""
    b, h, lq, lk, d = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen, device=device, dtype=dtype)
    k = torch.randn(b, h, lk, d, generator=gen, device=device, dtype=dtype)
    v = torch.randn(b, h, lk, d, generator=gen, device=device, dtype=dtype)
    ref = reference(q, k, v)
    tol = TOLERANCE[dtype]
    rows = []
    for kname, kernel in kernels.items():
        row = {"kernel": kname}
        try:
            out = kernel(q, k, v, mask=None, scale=None)
            _synchronize(device)
        except Exception as e:  # noqa: BLE001 - a backend that declines the shape or device
            row.update(status="unavailable", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            rows.append(row)
            continue
        err = relative_error(out, ref)
        del out
        row["error_rel"] = err
        if not err <= tol:
            row.update(status="inexact", reason=f"relative error {err:.3g} > tolerance {tol:g}; not timed, never chosen")
            rows.append(row)
            continue
        times = time_kernel(kernel, q, k, v, reps)
        median = statistics.median(times)
        row.update(status="exact", median_ms=round(median * 1e3, 4), min_ms=round(min(times) * 1e3, 4),
                   max_ms=round(max(times) * 1e3, 4), tflops=round(flops(shape) / median / 1e12, 2), reps=reps)
        rows.append(row)
    exact = [r for r in rows if r["status"] == "exact"]
    chosen = min(exact, key=lambda r: r["median_ms"])["kernel"] if exact else None
    return {"shape": name, "batch": b, "heads": h, "query_tokens": lq, "key_tokens": lk, "head_dim": d,
            "tolerance": tol, "kernels": rows, "chosen": chosen}


def candidates(names: list[str] | None = None) -> dict:
    """Registered kernels to compare (plugins' included), the reference excluded."""
    from core import attention
    from core.registry import get_registry

    get_registry()  # registers the plugins' kernels (fa4 where flash-attn-4 is installed)
    available = [n for n in attention.available_kernels() if n != REFERENCE]
    if names:
        unknown = [n for n in names if n not in attention.available_kernels()]
        if unknown:
            raise SystemExit(f"attention_kernels: error: unknown kernel(s) {', '.join(unknown)}; "
                             f"available: {', '.join(attention.available_kernels())}")
        available = names
    return {n: attention._KERNELS[n] for n in available}


def fa4_status() -> dict:
    """Whether FlashAttention-4 is installed and registered, and why not."""
    from core import attention
    from plugins.kernels import fa4

    status = {"installed": fa4.available(), "registered": "fa4" in attention.available_kernels()}
    if status["installed"]:
        try:
            import flash_attn.cute  # noqa: F401

            status["imports"] = True
        except Exception as e:  # noqa: BLE001
            status.update(imports=False, reason=f"{type(e).__name__}: {e}"[:300])
    else:
        status["reason"] = "flash-attn-4 is not installed (flash_attn.cute not found)"
    return status


def run(device: torch.device, dtype: torch.dtype, tiny: bool, names: list[str] | None, reps: int) -> dict:
    kernels = candidates(names)
    shapes = TINY_SHAPES if tiny else SHAPES
    env = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env.update(card=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    results = []
    for i, (name, shape) in enumerate(shapes.items()):
        results.append(compare_shape(name, shape, kernels, device, dtype, reps, seed=i))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"dtype": str(dtype).removeprefix("torch."), "reference": f"{REFERENCE} in float32", "environment": env,
            "fa4": fa4_status(), "shapes": results}


def format_table(report: dict) -> str:
    lines = [f"attention kernels, {report['dtype']} on {report['environment'].get('card', report['environment']['device'])}"]
    for s in report["shapes"]:
        lines.append(f"  {s['shape']}: B{s['batch']} H{s['heads']} Lq{s['query_tokens']} Lk{s['key_tokens']} "
                     f"D{s['head_dim']} -> chosen {s['chosen']}")
        for r in s["kernels"]:
            if r["status"] == "exact":
                lines.append(f"    {r['kernel']:<16} exact  err {r['error_rel']:.2e}  median {r['median_ms']:.3f} ms "
                             f"(min {r['min_ms']:.3f}, max {r['max_ms']:.3f})  {r['tflops']:.1f} TFLOP/s")
            else:
                lines.append(f"    {r['kernel']:<16} {r['status']}: {r['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU seconds)")
    parser.add_argument("--kernels", default=None, help="comma-separated kernel names (default: every registered one)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per kernel (default 10, 3 with --tiny)")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("attention_kernels: error: no CUDA device; run with --device cpu", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.kernels.split(",") if n.strip()] if args.kernels else None
    reps = args.reps or (3 if args.tiny else 10)
    report = run(device, DTYPES[args.dtype], args.tiny, names, reps)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    # exit 1 when a shape has no exact kernel at all (the comparison measured nothing there)
    return 1 if any(s["chosen"] is None for s in report["shapes"]) else 0


if __name__ == "__main__":
    sys.exit(main())
