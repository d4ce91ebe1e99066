"""A real-size Wan2.1-T2V-14B DiT on a machine with less RAM than its weights, under disk offload.

    python scripts/offload_wan14b_cpu.py write /data/wan14b        # ~28.6 GB: the official DiT files, bf16
    python scripts/offload_wan14b_cpu.py run /data/wan14b --json wan14b-disk.json

``write`` writes the DiT of the official Wan2.1-T2V-14B layout: ``diffusion_pytorch_model-0000i-of-
0000n.safetensors`` and its ``.index.json``, the official key names and shapes (40 blocks of width
5120), bf16, with random values (an N(0, 1) pool sliced at random offsets, scaled by 1/sqrt(fan_in):
random weights, written at disk speed without holding the model). It never holds more than one
shard in memory.

``run`` loads that DiT the way ``core.load(..., offload="disk")`` loads a DiT component (the
plugin's declared checkpoint file, checked against the model built on the meta device, resident
parameters copied, the 40 blocks left memory-mapped in the files) and runs one denoising step
(flow-matching Euler with classifier-free guidance 5.0: two DiT passes) at the smallest size, 1
frame of 16x16 pixels (1 token), on a random umT5-shaped context (1, 512, 4096): the text encoder
and VAE are not part of this proof. It prints (and ``--json`` writes) the times and the process's
host memory above its start: ``RssAnon`` (anonymous memory, what must fit in RAM) and ``RssFile``
(mapped checkpoint pages: page cache, reclaimable).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "wan2.1-t2v-14b"


def _dit_meta():
    from plugins.wan.dit import WAN_DIT_CONFIGS, WanModel

    with torch.device("meta"):
        return WanModel(WAN_DIT_CONFIGS[MODEL]).to(torch.bfloat16)


def write(root: Path, shards: int) -> dict:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    shapes = {k: tuple(v.shape) for k, v in _dit_meta().state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(1 << 26, generator=gen).to(torch.bfloat16)  # 64 Mi values
    total = sum(math.prod(s) for s in shapes.values()) * 2
    per_shard, keys = total / shards, list(shapes)
    stem = "diffusion_pytorch_model"
    weight_map, start, written = {}, time.perf_counter(), 0
    index = 0
    while keys:
        part, size = {}, 0
        while keys and (size < per_shard or index == shards - 1):
            key = keys.pop(0)
            shape = shapes[key]
            n = math.prod(shape)
            if len(shape) >= 2:
                scale = 1 / math.sqrt(math.prod(shape[1:]))
            else:
                scale = 0.0 if key.endswith("bias") else None
            if scale is None:  # norms: ones
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                offset = int(torch.randint(0, pool.numel(), (1,), generator=gen))
                reps = -(-(offset + n) // pool.numel())
                flat = pool.repeat(reps)[offset:offset + n] if reps > 1 else pool[offset:offset + n]
                t = (flat.float() * scale).to(torch.bfloat16).reshape(shape)
            part[key] = t
            size += n * 2
        index += 1
        name = f"{stem}-{index:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(root / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        written += size
        print(f"wrote {name}: {size / 1e9:.2f} GB ({written / 1e9:.1f} of {total / 1e9:.1f} GB, "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
        del part
    (root / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": written}, "weight_map": weight_map}, indent=2))
    return {"bytes": written, "files": index, "seconds": time.perf_counter() - start}


def run(root: Path, dtype: torch.dtype) -> dict:
    import core
    from core import offload as offloading
    from core.sampler import shifted_sigmas
    from core.spec import WeightsLayout
    from core.testing.memory import HostMemoryPeak, status_kib
    from core.weights import check_layout, deferred_parameters
    from plugins.wan.dit import WAN_DIT_CONFIGS, WanModel

    spec = core.get_registry().model(MODEL).spec
    dit_file = next(f for f in spec.weights.files if f.component == "dit")  # the plugin's own declaration
    config = WAN_DIT_CONFIGS[MODEL]
    device = torch.device("cpu")
    peak = HostMemoryPeak(interval=0.005).start()
    start = time.perf_counter()
    holder = core.Pipeline(device=device, dtype=dtype)
    with deferred_parameters():
        holder.dit = WanModel(config).to(dtype=dtype).eval().requires_grad_(False)
    checked = check_layout(root, dit_file, holder.dit)
    offloading.load_mapped(holder, WeightsLayout(files=[dit_file]), root, [checked], device,
                           dict(spec.repeated_blocks), 1)
    off = offloading.apply(holder, "disk", device)
    load_s = time.perf_counter() - start
    after_load = {"anon_bytes": peak.anon_bytes, "file_bytes": peak.file_bytes}
    for block in holder.dit.blocks:
        block.register_forward_hook(lambda *a: peak.sample(), prepend=True)
    gen = torch.Generator().manual_seed(0)
    context = {b: torch.randn(1, config.text_len, config.text_dim, generator=gen).to(dtype) for b in ("cond", "uncond")}
    x = holder.noise((1, config.in_dim, 1, 2, 2), seed=0)  # 1 frame of 16x16 pixels: one 1x2x2 patch
    sigmas = shifted_sigmas(1, 5.0)
    passes = []

    def velocity(x, sigma, branch, step):
        begin = time.perf_counter()
        v = holder.dit(x.to(dtype), (sigma * 1000).reshape(1), context[branch]).float()
        passes.append(time.perf_counter() - begin)
        return v

    begin = time.perf_counter()
    with torch.inference_mode(), off.generation():
        out = holder.denoise(x, sigmas, velocity, guidance_scale=5.0, progress=False)
    step_s = time.perf_counter() - begin
    peak.stop()
    weights = sum(p.numel() for p in holder.dit.parameters()) * 2  # as stored: bf16
    result = {
        "model": MODEL, "weights_bytes_bf16": weights, "compute_dtype": str(dtype).removeprefix("torch."),
        "offloaded_units": len(off.units), "size": "16x16, 1 frame (1 token), context 512 tokens, guidance 5.0",
        "load_s": load_s, "step_s": step_s, "dit_passes_s": passes, "finite": bool(torch.isfinite(out).all()),
        "peak_anon_bytes": peak.anon_bytes, "peak_file_bytes": peak.file_bytes, "after_load": after_load,
        "peak_anon_fraction_of_weights": peak.anon_bytes / weights,
        "peak_copies_bytes": off.peak_bytes_on_device, "vm_hwm_kib": status_kib("VmHWM")["VmHWM"],
        "mem_total_kib": _meminfo("MemTotal"), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    gb = 1e9
    print(f"{MODEL} DiT, {weights / gb:.1f} GB bf16 in {len(off.units)} mapped blocks, compute {result['compute_dtype']}")
    print(f"load {load_s:.1f} s, one step (2 DiT passes: {', '.join(f'{p:.1f}' for p in passes)} s) {step_s:.1f} s")
    print(f"peak RssAnon above start {peak.anon_bytes / gb:.2f} GB ({result['peak_anon_fraction_of_weights']:.1%} of the "
          f"weights), peak RssFile {peak.file_bytes / gb:.2f} GB, machine RAM {_meminfo('MemTotal') / 2**20:.1f} GiB")
    return result


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the official DiT files (random bf16 weights)")
    w.add_argument("root", type=Path)
    w.add_argument("--shards", type=int, default=12, help="safetensors shards (one is held in memory at a time)")
    r = sub.add_parser("run", help="one denoising step under disk offload")
    r.add_argument("root", type=Path)
    r.add_argument("--dtype", default="float32", help="compute dtype (default: float32, the CPU default)")
    r.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    if args.command == "write":
        print(json.dumps(write(args.root, args.shards)))
        return 0
    from core.loading import resolve_dtype

    result = run(args.root, resolve_dtype(args.dtype, torch.device("cpu")))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
