"""Cost of the pad-key mask on one device: attention over a padded shard with the mask (head dim
widened 128 → 136, q/k/v copied) against the same shard unpadded, at the per-rank shapes of
Qwen-Image 1328² (6,889 image + 128 text tokens, 24 heads) on 2 and 4 ranks (Ulysses: heads split).

    python scripts/pad_mask_cost.py [--device cuda] [--dtype bfloat16] [--iters 20]

Prints the median time of each and the ratio; both are exact (the masked output equals attention
over the real keys only, checked here).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from core.attention import sdpa
from core.parallel.keymask import mask_padded_keys


def timed(fn, iters: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real token count (CPU: use 0.25)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    total = int((6889 + 128) * args.scale)
    for world in (2, 4):
        heads = 24 // world  # Ulysses: every rank attends over the whole sequence with its heads
        shard = -(-total // world)
        padded = shard * world  # the all-to-all gathers equal shards: world·shard keys, `pad` of them padding
        pad = padded - total
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, padded, heads, 128, generator=gen).to(device, dtype) for _ in range(3))
        valid = torch.arange(padded, device=device) < total
        scale = 128 ** -0.5

        def masked():
            qm, km, vm = mask_padded_keys(q, k, v, valid)
            return sdpa(qm.transpose(1, 2), km.transpose(1, 2), vm.transpose(1, 2), scale=scale)[..., :128]

        def unpadded():
            return sdpa(q[:, :total].transpose(1, 2), k[:, :total].transpose(1, 2), v[:, :total].transpose(1, 2), scale=scale)

        err = (masked()[:, :, :total].float() - unpadded().float()).abs().max().item()
        t_mask, t_plain = timed(masked, args.iters, device), timed(unpadded, args.iters, device)
        print(f"world {world}: {total} tokens, shard {shard}, {pad} pad: masked {t_mask * 1e3:.2f} ms, "
              f"unpadded {t_plain * 1e3:.2f} ms, ratio {t_mask / t_plain:.3f}, max diff {err:.2e}")


if __name__ == "__main__":
    main()
