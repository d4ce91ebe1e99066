"""Offload on a GPU (core.offload): parity, block offload's step time against resident, peak device
memory per mode. Runs the same code on a CPU at tiny sizes (``--device cpu --tiny``).

    python scripts/offload_gpu.py --json offload-gpu.json          # CUDA: every part at real sizes
    python scripts/offload_gpu.py --only parity,compile            # some parts
    python scripts/offload_gpu.py --device cpu --tiny              # by hand on a CPU (tests: --only step,memory)

Parts (each prints its lines; ``--json FILE`` writes them all with the card and versions, rewritten
after each part with ``"finished": false`` until the last, so a run killed at a time limit keeps
the parts it finished):

1. ``parity``: the tiny presets of wan, qwen-image, mova and the example plugin in fp32 on the
   device; every mode (model, block, disk from a checkpoint written to a temporary folder) against
   the resident output, bit for bit.
2. ``compile``: the example plugin under block offload, ``compile_pipeline()`` (inductor): one
   graph per block class and no recompilation across sizes (``fail_on_recompile``).
3. ``step``: the Wan2.1-T2V-1.3B DiT at its real config, random bf16 weights, 832x480, 81 frames
   (32760 tokens): median DiT forward over ``--steps`` calls, resident, block, and disk (the DiT
   written as safetensors to a temporary folder), each as a ratio to resident (target for block:
   at most 1.3). CUDA events; ``--tiny``: the tiny DiT at 32x32, 5 frames.
4. ``memory``: wan2.1-t2v-14b and mova-360p at their official configs with random bf16 weights
   (``--tiny``: their tiny presets), one generation of one step without guidance at
   ``--frames`` frames of the preset's default size, per mode: peak device memory
   (``max_memory_allocated``), for model, block and then resident (an out-of-memory is reported as
   such). Disk keeps the same blocks on the device as block (same groups, same prefetch); it is
   measured in part 1 and part 3, not here (it needs the checkpoint on disk).

Exit status 0 when every parity is exact, compile never recompiled and (CUDA) block's step ratio
is at most 1.3; 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import core  # noqa: E402
from core import offload as offloading  # noqa: E402
from core.loading import _attach, load_spec  # noqa: E402
from core.weights import deferred_parameters  # noqa: E402

PROMPT = "a red fox running through fresh snow"
PARTS = ("parity", "compile", "step", "memory")
STEP_TARGET = 1.3


def log(line: str) -> None:
    print(line, flush=True)


def spec(name: str):
    """A registered model's spec; the example plugin from its source folder (no install needed)."""
    if name == "example-dit":
        from core.testing import Subject

        folder = str(ROOT / "examples" / "ditkit-example-plugin")
        if folder not in sys.path:
            sys.path.append(folder)
        return Subject("example-dit", plugin="ditkit_example.plugin").spec
    return core.get_registry().model(name).spec


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- 1. parity ---------------------------------------------------------------------------------

CALLS = {"wan": dict(num_inference_steps=2), "qwen-image": dict(num_inference_steps=2),
         "mova": dict(num_inference_steps=2, image=torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))),
         "example-dit": dict(num_inference_steps=2, height=40, width=56)}


def parity(device) -> list[dict]:
    from core.weights import write_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, call in CALLS.items():
            model_spec = spec(name)
            host = load_spec(model_spec, "tiny", device="cpu", dtype=torch.float32)  # the same seeded weights
            root = Path(tmp) / name
            if model_spec.checkpoint_writer is not None:
                model_spec.checkpoint_writer(host, root)
            else:
                write_checkpoint(host, root, model_spec.weights)
            del host
            ref = load_spec(model_spec, "tiny", device=device, dtype=torch.float32)(PROMPT, seed=1, progress=False, **call)
            ref = ref.tensor()
            for mode in offloading.MODES:
                pipe = load_spec(model_spec, "tiny", device=device, dtype=torch.float32, offload=mode,
                                 weights=root if mode == "disk" else None)
                out = pipe(PROMPT, seed=1, progress=False, **call).tensor()
                row = {"model": name, "mode": mode, "equal": bool(torch.equal(out, ref)),
                       "max_abs_diff": float((out - ref).abs().max()), "units": len(pipe.offload.units),
                       "left_on_device": pipe.offload.materialised()}
                rows.append(row)
                log(f"parity {name:12s} {mode:6s} {'EXACT' if row['equal'] else 'DIFFERS'} "
                    f"max|diff| {row['max_abs_diff']:.3g}  units {row['units']}")
                del pipe
    return rows


# -- 2. compile --------------------------------------------------------------------------------


def compile_check(device) -> dict:
    from core.testing.checks import rel_error

    example = spec("example-dit")
    torch._dynamo.reset()
    pipe = load_spec(example, "tiny", device=device, dtype=torch.float32, offload="block")
    eager = load_spec(example, "tiny", device=device, dtype=torch.float32)
    report = pipe.compile_pipeline(compile_models=["dit"])
    call = dict(seed=2, progress=False, num_inference_steps=2)
    start = time.perf_counter()
    out = pipe(PROMPT, height=40, width=56, **call).tensor()
    first_s = time.perf_counter() - start
    err = rel_error(out, eager(PROMPT, height=40, width=56, **call).tensor())
    recompiled = None
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            for (h, w), scale in (((32, 48), 1.0), ((64, 40), 3.0), ((40, 56), 3.0)):
                pipe(PROMPT, height=h, width=w, guidance_scale=scale, **call)
    except RuntimeError as exc:
        recompiled = str(exc)[-300:]
    result = {"graphs": report.graphs(), "recompiled": recompiled, "rel_error_vs_eager": err, "first_call_s": first_s,
              "passed": recompiled is None and set(report.graphs().values()) == {1} and err <= 1e-4}
    log(f"compile block offload: graphs {result['graphs']}, recompiled: {recompiled or 'no'}, "
        f"rel. error vs eager {err:.2e}, first call {first_s:.1f} s")
    return result


# -- 3. step time ------------------------------------------------------------------------------


def _random_(module: nn.Module, device: torch.device) -> None:
    """Random weights drawn on ``device`` and kept where the module's parameters are (a real-size
    model in seconds): matrices N(0, 1/fan_in), vectors (norms) 1, biases 0."""
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                value = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) / fan_in**0.5
            elif name.endswith("bias"):
                value = torch.zeros(p.shape, device=device)
            else:
                value = torch.ones(p.shape, device=device)
            p.copy_(value.to(p.dtype))


def _dit_holder(model: nn.Module, device, dtype) -> core.Pipeline:
    holder = core.Pipeline(device=device, dtype=dtype)
    holder.dit = model
    return holder


def _time_dit(holder, inputs, steps: int, device) -> list[float]:
    times = []
    off = holder.offload
    with torch.inference_mode(), (off.generation() if off is not None else _null()):
        for i in range(steps + 1):
            sync(device)
            start = time.perf_counter()
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            holder.dit(*inputs)
            if device.type == "cuda":
                end.record()
                torch.cuda.synchronize(device)
                elapsed = begin.elapsed_time(end) / 1000
            else:
                elapsed = time.perf_counter() - start
            if i:  # the first call learns the order (and warms kernels)
                times.append(elapsed)
    return times


def _null():
    import contextlib

    return contextlib.nullcontext()


def step(device, tiny: bool, steps: int) -> dict:
    from plugins.wan.dit import WAN_DIT_CONFIGS, WanDiTConfig, WanModel

    from core.offload import load_mapped
    from core.spec import WeightFile, WeightsLayout
    from core.weights import check_layout

    dtype = torch.float32 if tiny and device.type == "cpu" else torch.bfloat16
    config = WanDiTConfig.tiny("t2v") if tiny else WAN_DIT_CONFIGS["wan2.1-t2v-1.3b"]
    frames, height, width = (5, 32, 32) if tiny else (81, 480, 832)
    lat = (1, config.in_dim, (frames - 1) // 4 + 1, height // 8, width // 8)
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = (torch.randn(lat, generator=gen, device=device, dtype=dtype), torch.tensor([500.0], device=device),
              torch.randn(1, config.text_len, config.text_dim, generator=gen, device=device, dtype=dtype))
    with torch.device("meta"):
        shape_model = WanModel(config)
    model = WanModel(config).to(dtype=dtype).eval().requires_grad_(False)
    _random_(model, device)
    results = {"config": "tiny" if tiny else "wan2.1-t2v-1.3b", "size": f"{width}x{height}x{frames}",
               "tokens": lat[2] * lat[3] * lat[4] // 4, "dtype": str(dtype).removeprefix("torch."), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{tmp}/dit.safetensors")
        holders = {}
        resident = _dit_holder(model, device, dtype)
        resident.dit.to(device)
        holders[None] = resident
        times = {"resident": _time_dit(resident, inputs, steps, device)}
        resident.dit.to("cpu")
        del holders[None]
        block = _dit_holder(model, device, dtype)
        off = offloading.apply(block, "block", device)
        times["block"] = _time_dit(block, inputs, steps, device)
        results["block_peak_copies_mb"] = off.peak_bytes_on_device / 2**20
        offloading.remove(block, keep_on_host=True)
        # disk: the DiT's blocks mapped from the file just written
        layout = WeightsLayout(files=[WeightFile(component="dit", path="dit.safetensors")])
        with deferred_parameters():
            mapped = _dit_holder(WanModel(config).to(dtype=dtype).eval().requires_grad_(False), torch.device("cpu"),
                                 dtype)
        checked = [check_layout(Path(tmp), layout.files[0], shape_model.to(dtype=dtype))]
        load_mapped(mapped, layout, Path(tmp), checked, device, {}, 1)
        offloading.apply(mapped, "disk", device)
        times["disk"] = _time_dit(mapped, inputs, steps, device)
    base = statistics.median(times["resident"])
    for mode, ts in times.items():
        med = statistics.median(ts)
        results["modes"][mode] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "ratio_to_resident": med / base}
        log(f"step {results['config']} {results['size']} {mode:8s} median {med:.4f} s (min {min(ts):.4f}, "
            f"max {max(ts):.4f}) x{med / base:.2f} resident")
    results["passed"] = device.type != "cuda" or results["modes"]["block"]["ratio_to_resident"] <= STEP_TARGET
    return results


# -- 4. memory ---------------------------------------------------------------------------------


def _random_pipeline(model_spec, preset: str, dtype, device):
    """The preset's pipeline with random weights held in host memory, built without ever holding
    fp32 weights (the parameters are created on the meta device, then drawn on ``device``)."""
    chosen = model_spec.presets[preset]
    with deferred_parameters():
        pipe = model_spec.pipeline(dict(chosen.config), device=torch.device("cpu"), dtype=dtype, weights=None)
    _attach(pipe, model_spec, chosen)
    replaced: dict[int, nn.Parameter] = {}
    for module in pipe.components().values():
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is None:
                    continue
                if id(p) not in replaced:
                    replaced[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
                m._parameters[name] = replaced[id(p)]
    for module in pipe.components().values():
        _random_(module, device)
    return pipe


MEMORY_MODELS = {"wan2.1-t2v-14b": {}, "mova-360p": {}}


def memory(device, tiny: bool, frames: int) -> list[dict]:
    rows = []
    dtype = torch.float32 if tiny and device.type == "cpu" else torch.bfloat16
    for name in MEMORY_MODELS:
        model_spec = spec(name)
        preset = "tiny" if tiny else "official"
        start = time.perf_counter()
        pipe = _random_pipeline(model_spec, preset, dtype, device)
        built = time.perf_counter() - start
        weights = offloading.footprint(pipe).total
        call = dict(model_spec.presets[preset].defaults)
        call.update(num_inference_steps=1, guidance_scale=1.0, num_frames=frames, seed=0, progress=False)
        if model_spec.capabilities.image_input:
            call["image"] = torch.rand(3, call.get("height", 32), call.get("width", 32))
        for mode in ("model", "block", None):
            row = {"model": name, "preset": preset, "mode": mode or "none", "weights_gb": weights / 1e9,
                   "build_s": built, "size": f"{call.get('width')}x{call.get('height')}x{frames}"}
            try:
                if mode is None:
                    pipe.to(device)
                else:
                    offloading.apply(pipe, mode, device)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                begin = time.perf_counter()
                pipe(PROMPT, **call)
                row["generate_s"] = time.perf_counter() - begin
                row["peak_device_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
                if mode is not None:
                    row["peak_offloaded_copies_gb"] = pipe.offload.peak_bytes_on_device / 1e9
            except torch.OutOfMemoryError as exc:
                row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
            except core.DitkitError as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                if mode is not None and pipe.offload is not None:
                    offloading.remove(pipe, keep_on_host=True)
                    pipe.device = torch.device("cpu")
            rows.append(row)
            peak = row.get("peak_device_gb")
            log(f"memory {name} [{preset}] offload={row['mode']:5s} weights {row['weights_gb']:.2f} GB  "
                + (f"peak device {peak:.2f} GB" if peak is not None else row.get("error", "peak device n/a (cpu)")))
        del pipe
    return rows


# -- main --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The command line (scripts/gpu_all.py's offload stage is checked against it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs and sizes (a CPU run)")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    p.add_argument("--steps", type=int, default=3, help="measured DiT calls per mode in 'step' (after one warm-up)")
    p.add_argument("--frames", type=int, default=17, help="frames generated in 'memory'")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="the report, rewritten after each part (a run killed at a time limit keeps the parts done)")
    return p


def parts_of(only: str) -> list[str]:
    """``--only``'s parts; ValueError naming an unknown one."""
    parts = [p.strip() for p in only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; parts: {', '.join(PARTS)}")
    return parts


def main(argv=None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    device = core.loading.default_device() if args.device is None else torch.device(args.device)
    try:
        parts = parts_of(args.only)
    except ValueError as exc:
        cli.error(str(exc))
    from core.environment import environment

    report = {"environment": environment(device), "tiny": args.tiny, "parts": parts, "finished": False}

    def save() -> None:
        if args.json:  # atomically: a kill between parts leaves the last whole report
            path = Path(args.json)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=2, default=str))
            tmp.replace(path)

    ok = True
    if "parity" in parts:
        report["parity"] = parity(device)
        ok &= all(r["equal"] and not r["left_on_device"] for r in report["parity"])
        save()
    if "compile" in parts:
        report["compile"] = compile_check(device)
        ok &= report["compile"]["passed"]
        save()
    if "step" in parts:
        report["step"] = step(device, args.tiny, args.steps)
        ok &= report["step"]["passed"]
        save()
    if "memory" in parts:
        report["memory"] = memory(device, args.tiny, 5 if args.tiny else args.frames)
    report["passed"] = bool(ok)
    report["finished"] = True
    save()
    log("PASSED" if ok else "FAILED")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
