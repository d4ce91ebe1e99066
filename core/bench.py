"""``ditkit bench``: eager against compiled variants of one model, measured in one process.

For each variant (``eager``, ``regional``: :meth:`Pipeline.compile_pipeline`, ``whole``: the DiT's
``forward`` compiled as one region) the bench builds the preset with seeded random weights (no
checkpoint: a real-size preset is built from its config, directly on the device and in the
benchmarked dtype), then reports

* ``build_s``: building the pipeline;
* ``first_call_s``: the first generation, compilation included (what a user waits for);
* ``step_s``: the median time of one DiT forward over the measured steps after the warm-up
  (CUDA events on a GPU, ``perf_counter`` on a CPU), with ``step_min_s``, ``step_max_s`` and
  ``spread`` (max / min), and ``ratio_to_eager`` (eager / variant medians, so above 1 is faster),
  eager measured in the same process;
* ``graphs``, ``graph_breaks``, ``recompiles``: from dynamo's counters for that variant;
* ``peak_host_mb`` (the process's peak resident memory after the variant's first call, earlier
  variants included) and ``peak_device_mb`` (the peak device memory of the variant's build and
  first call, above what was allocated before it).

The measured steps are interleaved: every variant is built and warmed up first, then each round
runs one one-step generation per variant in turn (round-robin), so a machine that gets busier or
quieter during the run slows every variant alike. All variants are resident at once for that;
``interleave=False`` (``--sequential``) measures one variant after the other instead, for models
whose variants do not fit in memory together. A variant whose steps spread by more than
:data:`SPREAD_WARNING` (max / min) is flagged in the table: the machine was not quiet enough for
its ratio to mean much.

The DiT is the first compilable component with repeated blocks (or the first compilable one);
its forward is timed through hooks, so the bench needs nothing model-specific. Guidance is 1.0
(one DiT call per step) unless ``guidance_scale`` is given.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .environment import environment
from .errors import InputError
from .jsonreport import STDOUT, add_json_argument, write_json

__all__ = ["VARIANTS", "SPREAD_WARNING", "BenchResult", "run_bench", "format_bench", "environment"]

VARIANTS = ("eager", "regional", "whole")
PROMPT = "a red fox running through fresh snow, golden hour"
SPREAD_WARNING = 1.3
"""A variant's max / min step time above this is flagged: the figures are noise-bound."""


@dataclass
class BenchResult:
    variant: str
    build_s: float
    first_call_s: float
    step_s: float
    step_times_s: list[float]
    step_min_s: float = 0.0
    step_max_s: float = 0.0
    spread: float = 1.0
    """max / min of the measured steps (above :data:`SPREAD_WARNING`: flagged)."""
    ratio_to_eager: float | None = None
    graphs: int = 0
    graph_breaks: int = 0
    recompiles: int = 0
    peak_host_mb: float = 0.0
    peak_device_mb: float | None = None
    tokens: int | None = None
    compiled: dict[str, int] = field(default_factory=dict)
    """Graphs per compiled region (``regional``: one per block class)."""


def _dit_name(pipe) -> str:
    from .compile import repeated_block_names

    spec = pipe.spec
    comps = pipe.components()
    for name in spec.compilable_models:
        if repeated_block_names(comps[name], spec.repeated_blocks.get(name, ())):
            return name
    if not spec.compilable_models:
        raise InputError(f"model {spec.name!r} declares no compilable component to benchmark")
    return spec.compilable_models[0]


class _Timer:
    """Times every forward of one module; records the token count of its first repeated block."""

    def __init__(self, module: torch.nn.Module, device: torch.device, block_cls: type | None):
        self.device, self.times, self.tokens = device, [], None
        self._start = None
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]
        if block_cls is not None:
            first = next(m for m in module.modules() if type(m) is block_cls)
            self._handles.append(first.register_forward_pre_hook(self._tokens))

    def _tokens(self, module, args):
        # written on every call and never read here: under ``whole`` this hook is traced into the
        # compiled forward, and a read of ``self.tokens`` would be a guard that fails once it is set
        # (a recompile in the first measured step)
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            self.tokens = args[0].shape[1]

    def _pre(self, module, args):
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def _post(self, module, args, output):
        if self.device.type == "cuda":
            self._end.record()
            torch.cuda.synchronize(self.device)
            self.times.append(self._start.elapsed_time(self._end) / 1000.0)
        else:
            self.times.append(time.perf_counter() - self._start)

    def remove(self):
        for h in self._handles:
            h.remove()


def _build(spec, preset: str, device: torch.device, dtype: torch.dtype):
    from .loading import _attach

    chosen = spec.presets[preset]
    # Random init straight on the device and in the final dtype: a real-size model (Qwen-Image's
    # 27 B parameters, Wan 14B's 20 B) never exists on the CPU, nor in float32 on the way to bf16.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            pipe = spec.pipeline(dict(chosen.config), device=device, dtype=dtype, weights=None)
    finally:
        torch.set_default_dtype(previous)
    _attach(pipe, spec, chosen)
    return pipe


def _compile(pipe, variant: str, dit: str):
    if variant == "regional":
        return pipe.compile_pipeline()
    if variant == "whole":
        module = getattr(pipe, dit)
        module.forward = torch.compile(module.forward, dynamic=True)
    return None


def run_bench(
    name: str,
    *,
    preset: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    compare: tuple[str, ...] = ("eager", "regional"),
    steps: int = 5,
    warmup: int = 1,
    attention: str | None = None,
    progress: bool | None = None,
    interleave: bool = True,
    **call: Any,
) -> dict[str, Any]:
    """Benchmark ``compare`` variants of model ``name``; returns the JSON-ready report.

    ``call`` holds generation arguments (``height``, ``width``, ``num_frames``, ...); unset ones
    take the preset's defaults. Each variant runs a first call (``warmup`` steps: compilation),
    then ``steps`` measured steps, round-robin across the variants (``interleave=False``: one
    variant after the other).
    """
    from tqdm.auto import tqdm

    from . import attention as attn
    from .loading import default_device, resolve_dtype
    from .registry import get_registry

    unknown = [v for v in compare if v not in VARIANTS]
    if unknown or not compare:
        raise InputError(f"unknown bench variant(s) {unknown or compare}; choose from {', '.join(VARIANTS)}")
    if not isinstance(steps, int) or steps < 1 or not isinstance(warmup, int) or warmup < 1:
        raise InputError(f"steps and warmup must be positive integers, got {steps!r} and {warmup!r}")
    spec = get_registry().model(name).spec
    preset = preset or spec.default_preset
    if preset not in spec.presets:
        raise InputError(f"model {spec.name!r} has no preset {preset!r}; presets: {', '.join(sorted(spec.presets))}")
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    call = {k: v for k, v in call.items() if v is not None}
    call.setdefault("guidance_scale", 1.0)
    results: list[BenchResult] = []
    kernel = attn.use_kernel(attention) if attention else None
    if kernel is not None:
        kernel.__enter__()
    bar = tqdm(total=len(compare) * (1 + steps), desc=f"bench {spec.name}",
               disable=None if progress is None else not progress)
    torch._dynamo.reset()
    try:
        if interleave:
            runs = []
            for variant in compare:  # all built and warmed up first; their compiled code stays valid
                runs.append(_Run(spec, preset, device, dtype, variant, warmup, call))
                bar.update()
            for _ in range(steps):  # round-robin: drift on the machine hits every variant alike
                for run in runs:
                    run.measure_step(call)
                    bar.update()
            results = [run.result() for run in runs]
        else:
            for variant in compare:  # one at a time: only one variant is resident
                torch._dynamo.reset()
                run = _Run(spec, preset, device, dtype, variant, warmup, call)
                for _ in range(steps):
                    run.measure_step(call)
                results.append(run.result())
                del run
                bar.update(1 + steps)
    finally:
        bar.close()
        if kernel is not None:
            kernel.__exit__(None, None, None)
    eager = next((r for r in results if r.variant == "eager"), None)
    for r in results:
        r.ratio_to_eager = (eager.step_s / r.step_s) if eager is not None and r.step_s > 0 else None
    return {"model": spec.name, "preset": preset, "dtype": str(dtype).removeprefix("torch."),
            "call": {k: v for k, v in call.items() if isinstance(v, (int, float, str, bool))},
            "steps": steps, "warmup": warmup, "attention": attention or attn.selected_kernel_name(),
            "order": "round-robin" if interleave else "sequential", "spread_warning": SPREAD_WARNING,
            "environment": environment(device), "results": [asdict(r) for r in results]}


class _Run:
    """One variant: built, compiled and warmed up on creation; :meth:`measure_step` times one
    step (a one-step generation: its DiT forwards), :meth:`result` reports."""

    def __init__(self, spec, preset, device, dtype, variant, warmup, call):
        from torch._dynamo.utils import counters

        from .compile import repeated_block_names

        counters.clear()  # process-wide: read for this variant before the next one is built
        self.variant, self.device = variant, device
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        self.pipe = _build(spec, preset, device, dtype)
        self.build_s = time.perf_counter() - start
        dit = _dit_name(self.pipe)
        module = getattr(self.pipe, dit)
        names = repeated_block_names(module, spec.repeated_blocks.get(dit, ()))
        block_cls = next((type(m) for m in module.modules() if names and type(m).__name__ == names[0]), None)
        self.report = _compile(self.pipe, variant, dit)
        self.timer = _Timer(module, device, block_cls)
        start = time.perf_counter()
        self.pipe(PROMPT, seed=0, num_inference_steps=warmup, progress=False, **call)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.first_call_s = time.perf_counter() - start
        self.peak_device_mb = (round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
                               if device.type == "cuda" else None)
        # dynamo's counters are process-wide: this variant's are read now, before the next one runs
        self.graphs = self.graphs_after_first = counters["stats"]["unique_graphs"]
        self.graph_breaks = sum(counters["graph_break"].values())
        self.peak_host_mb = round(_peak_host_mb(), 1)  # after this variant's first call (earlier variants included)
        self.timer.times.clear()

    def measure_step(self, call) -> None:
        from torch._dynamo.utils import counters

        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        self.pipe(PROMPT, seed=1, num_inference_steps=1, progress=False, **call)
        self.graphs += counters["stats"]["unique_graphs"] - graphs  # compiled during a measured step: a recompile
        self.graph_breaks += sum(counters["graph_break"].values()) - breaks

    def result(self) -> BenchResult:
        times = list(self.timer.times)
        self.timer.remove()
        return BenchResult(
            variant=self.variant, build_s=round(self.build_s, 4), first_call_s=round(self.first_call_s, 4),
            step_s=statistics.median(times), step_times_s=[round(t, 5) for t in times],
            step_min_s=min(times), step_max_s=max(times), spread=round(max(times) / min(times), 3) if min(times) > 0 else 1.0,
            graphs=self.graphs, graph_breaks=self.graph_breaks, recompiles=self.graphs - self.graphs_after_first,
            peak_host_mb=self.peak_host_mb, peak_device_mb=self.peak_device_mb,
            tokens=None if self.timer.tokens is None else int(self.timer.tokens),
            compiled=self.report.graphs() if self.report is not None else {},
        )


def _peak_host_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def format_bench(report: dict) -> str:
    """The report as a table; a variant whose steps spread by more than ``spread_warning``
    (max / min) is marked ``!`` and explained under the table."""
    env = report["environment"]
    card = env.get("card") or env["processor"]
    limit = report.get("spread_warning", SPREAD_WARNING)
    head = (f"ditkit bench {report['model']} [{report['preset']}] {report['dtype']} on {card} "
            f"(torch {env['torch']}, triton {env['triton']}, {env['threads']} threads), call {report['call']}, "
            f"{report['steps']} steps ({report.get('order', 'sequential')})")
    cols = ("variant", "build s", "first call s", "step s median", "min", "max", "max/min", "vs eager", "graphs",
            "breaks", "recompiles", "host MB", "device MB", "tokens")
    rows, notes = [cols], []
    for r in report["results"]:
        ratio = f"{r['ratio_to_eager']:.2f}x" if r["ratio_to_eager"] is not None else "-"
        spread = r.get("spread", 1.0)
        flag = "!" if spread > limit else ""
        if flag:
            notes.append(f"! {r['variant']}: its steps ranged {r['step_min_s']:.4f}-{r['step_max_s']:.4f} s "
                         f"(max/min {spread:.2f} > {limit}): the machine was not quiet; its median and ratio are unreliable")
        rows.append((r["variant"], f"{r['build_s']:.2f}", f"{r['first_call_s']:.2f}", f"{r['step_s']:.4f}",
                     f"{r.get('step_min_s', r['step_s']):.4f}", f"{r.get('step_max_s', r['step_s']):.4f}",
                     f"{spread:.2f}{flag}", ratio, str(r["graphs"]), str(r["graph_breaks"]), str(r["recompiles"]),
                     f"{r['peak_host_mb']:.0f}", "-" if r["peak_device_mb"] is None else f"{r['peak_device_mb']:.0f}",
                     str(r["tokens"] or "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + notes)


def add_arguments(parser) -> None:
    """The ``ditkit bench`` options (the CLI registers the subcommand with these)."""
    parser.add_argument("model")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--attention", default=None, help="attention kernel (default: DITKIT_ATTENTION or sdpa)")
    parser.add_argument("--compare", default="eager,regional", help=f"comma-separated variants of {','.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=5, help="measured DiT steps per variant (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    add_json_argument(parser)
    parser.add_argument("--sequential", action="store_true",
                        help="measure one variant after the other (default: all resident, steps round-robin)")
    parser.add_argument("--no-progress", action="store_true")
    from .load_bench import add_arguments as load_arguments

    load_arguments(parser)  # --load --weights DIR: loading against the disk (core/load_bench.py)


def main(args) -> int:
    """Run ``ditkit bench`` with parsed ``args``; print the table, write ``--json``."""
    if args.load or args.weights:
        from .load_bench import main as load_main

        return load_main(args)
    report = run_bench(
        args.model, preset=args.preset, device=args.device, dtype=args.dtype,
        compare=tuple(v.strip() for v in args.compare.split(",") if v.strip()), steps=args.steps,
        warmup=args.warmup, attention=args.attention, progress=False if args.no_progress else None,
        interleave=not args.sequential,
        height=args.height, width=args.width, num_frames=args.num_frames, guidance_scale=args.guidance_scale,
    )
    if args.json != STDOUT:
        print(format_bench(report))
    if args.json:
        write_json(json.dumps(report, indent=2), args.json)
    return 0
