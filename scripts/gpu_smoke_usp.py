"""Smoke test of the USP engine's numerics on one device: what one GPU can check.

    python scripts/gpu_smoke_usp.py                      # CUDA: cuDNN/flash SDPA with log-sum-exp
    python scripts/gpu_smoke_usp.py --device cpu --small # the same checks with the CPU kernel (CI runs this)
    torchrun --nproc_per_node=2 scripts/gpu_smoke_usp.py # also the engine across 2 GPUs (NCCL)
    python scripts/gpu_smoke_usp.py --break-lse          # a deliberate zero LSE: must exit 1
    python scripts/gpu_smoke_usp.py --json smoke.json    # also write the rows as JSON (scripts/gpu_all.py)

Ring attention is only exact when each block kernel returns a *true* log-sum-exp: the ring merges
the partial outputs of key chunks by their LSEs. So, in bf16 and fp32, at uneven lengths:

1. ``lse``: the block kernel's LSE against a float64 reference computed from the same inputs;
2. ``ring-merge``: attention over two uneven key chunks, each through the block kernel, merged
   with yunchang's ``update_out_and_lse`` (what its ring attention runs), against attention over
   all keys at once;
3. ``engine`` (CUDA): the USP engine on this world (1 GPU: no exchange; N GPUs: Ulysses) against
   single-device SDPA at DiT shapes (Wan 1.3B 480p, an odd length, Qwen-Image 1328²).

Tolerances (absolute for the LSE, relative ‖got − ref‖/‖ref‖ for outputs): fp32 1e-4 / 1e-5
(accumulation order only); bf16 2e-2 / 2e-2 (inputs are rounded to 8 bits of mantissa and the
kernels accumulate in fp32, so errors of order 2^-8 per element are expected, not more).
Exits 0 when every check is within tolerance, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}  # (lse abs, output rel)


def block_kernel(device: torch.device):
    from core.parallel.engine import cpu_flash_lse, cuda_sdpa_lse

    return cuda_sdpa_lse if device.type == "cuda" else cpu_flash_lse


def reference(q, k, v, scale):
    """float64 attention and its log-sum-exp: ``(B, L, H, D)`` in, ``(out, lse[B, H, L])`` out."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v.double())
    return out, lse


def rel(got, ref) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm()).item()


def run_checks(device: torch.device, small: bool, break_lse: bool) -> list[tuple[str, float, float]]:
    """``(name, error, tolerance)`` rows for the LSE and ring-merge checks."""
    from yunchang.ring.utils import update_out_and_lse

    kernel = block_kernel(device)
    if break_lse:
        inner = kernel

        def kernel(*args, **kwargs):  # noqa: F811 - the deliberate mutation
            out, lse = inner(*args, **kwargs)
            return out, torch.zeros_like(lse)  # what yunchang's TORCH_MATH kernel returns

    heads, dim = (2, 64) if small else (24, 128)
    lq, lk1, lk2 = (37, 29, 22) if small else (1777, 1501, 1000)  # odd, uneven chunks
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(1, lq, heads, dim, generator=gen).to(device, dtype)
        k = torch.randn(1, lk1 + lk2, heads, dim, generator=gen).to(device, dtype)
        v = torch.randn(1, lk1 + lk2, heads, dim, generator=gen).to(device, dtype)
        scale = dim ** -0.5
        lse_tol, out_tol = TOLERANCE[dtype]
        name = str(dtype).removeprefix("torch.")

        out, lse = kernel(q, k, v, 0.0, scale, False)
        ref_out, ref_lse = reference(q, k, v, scale)
        rows.append((f"lse {name} L={lq}x{lk1 + lk2}", (lse.double() - ref_lse).abs().max().item(), lse_tol))
        rows.append((f"kernel output {name}", rel(out, ref_out), out_tol))

        merged, merged_lse = None, None
        for ks, vs in ((k[:, :lk1], v[:, :lk1]), (k[:, lk1:], v[:, lk1:])):
            block_out, block_lse = kernel(q, ks, vs, 0.0, scale, False)
            merged, merged_lse = update_out_and_lse(merged, merged_lse, block_out, block_lse)
        rows.append((f"ring-merge {name} keys {lk1}+{lk2}", rel(merged, ref_out), out_tol))
    return rows


def engine_rows(device: torch.device) -> list[tuple[str, float, float]]:
    """The USP engine on this torchrun world against single-device SDPA at DiT shapes (CUDA)."""
    import torch.nn.functional as F

    from core.parallel import init_mesh, make_engine
    from core.parallel.shards import ShardLayout, gather_tensor, shard_tensor

    shapes = {"wan1.3b-480p": (12, 32760), "odd": (12, 32761), "qwen-1328": (24, 7017)}
    mesh = init_mesh(heads=[h for h, _ in shapes.values()])
    engine = make_engine(mesh)
    print(f"engine {engine!r} on {torch.cuda.get_device_name()}, world {mesh.world_size}")
    rows = []
    for name, (heads, tokens) in shapes.items():
        layout = ShardLayout(tokens, mesh.sp_degree, mesh.sp_rank)
        if layout.padded:
            continue  # padded shards need the router's key mask; tests/parallel covers it on gloo
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, tokens, heads, 128, generator=gen).to(mesh.device, torch.bfloat16) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        shard = [shard_tensor(t, 1, layout) for t in (q, k, v)]
        out = gather_tensor(engine(*shard, 128 ** -0.5), 1, layout, mesh.sp_group)
        rows.append((f"engine {name} heads {heads} tokens {tokens}", rel(out, ref), TOLERANCE[torch.bfloat16][1]))
    mesh.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small shapes (seconds on a CPU)")
    parser.add_argument("--break-lse", action="store_true", help="return a zero LSE (yunchang TORCH_MATH's bug): the checks must fail")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; run with --device cpu for the CPU kernel", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()})" if device.type == "cuda" else ""))
    rows = run_checks(device, args.small, args.break_lse)
    if device.type == "cuda" and not args.break_lse and "WORLD_SIZE" in os.environ:
        rows += engine_rows(device)
    bad = 0
    for name, err, tol in rows:
        ok = err <= tol
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.3g} (tolerance {tol:g})")
    print(f"{len(rows) - bad} passed, {bad} failed")
    if args.json:
        env = {"torch": torch.__version__, "device": str(device), "world_size": int(os.environ.get("WORLD_SIZE", 1))}
        if device.type == "cuda":
            env.update(card=torch.cuda.get_device_name(), cudnn=torch.backends.cudnn.version())
        checks = [{"check": name, "error": err, "tolerance": tol, "ok": err <= tol} for name, err, tol in rows]
        with open(args.json, "w") as f:
            json.dump({"environment": env, "checks": checks, "passed": len(rows) - bad, "failed": bad}, f, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
