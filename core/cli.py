"""The ``ditkit`` command: ``plugins``, ``run``, ``check``, ``bench``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from .errors import DitkitError


def _cmd_plugins(args) -> int:
    from .registry import get_registry

    registry = get_registry()
    plugins = [asdict(p) for p in registry.plugins()]
    failures = [asdict(f) for f in registry.failures]
    models = {
        r.spec.name: {"plugin": r.plugin, "distribution": r.distribution, "aliases": r.spec.aliases,
                      "presets": sorted(r.spec.presets), "output": r.spec.capabilities.output}
        for r in registry.models()
    }
    if args.json:
        print(json.dumps({"plugins": plugins, "models": models, "load_errors": failures}, indent=2))
        return 0
    if not plugins and not failures:
        print("no ditkit plugins installed")
    for p in plugins:
        print(f"{p['name']}  ({p['distribution']} {p['version']})")
        print(f"  hooks:  {', '.join(p['hooks']) or '-'}")
        for m in p["models"]:
            info = models[m]
            aliases = f" (aliases: {', '.join(info['aliases'])})" if info["aliases"] else ""
            print(f"  model:  {m}{aliases}  presets: {', '.join(info['presets'])}  output: {info['output']}")
    for f in failures:
        print(f"{f['plugin']}  ({f['distribution']})  FAILED TO LOAD: {f['error']}")
    return 0


def _cmd_run(args) -> int:
    import core

    if args.nproc and args.nproc > 1:
        from .parallel.launch import relaunch_cli

        return relaunch_cli(args.nproc, sys.argv[1:])
    options = {}
    if args.usp:
        options.update(use_usp=True)
    pipe = core.load(args.model, preset=args.preset, weights=args.weights, device=args.device, dtype=args.dtype, **options)
    is_main = pipe.parallel is None or pipe.parallel.is_main
    if args.compile:
        report = pipe.compile_pipeline()
        if is_main:
            print(report)
    gen = {k: v for k, v in (("num_inference_steps", args.steps), ("height", args.height), ("width", args.width),
                             ("guidance_scale", args.guidance_scale), ("negative_prompt", args.negative_prompt),
                             ("num_frames", args.num_frames)) if v is not None}
    if args.image is not None:
        gen["image"] = _read_image(args.image)
    start = time.perf_counter()
    output = pipe(args.prompt, seed=args.seed, progress=False if args.no_progress else None, **gen)
    elapsed = time.perf_counter() - start
    if is_main:
        out = args.out or f"{pipe.spec.name}.{ {'image': 'png', 'video': 'mp4', 'audio': 'wav', 'video+audio': 'mp4'}[output.kind] }"
        written = core.write_output(output, out)
        print(f"wrote {', '.join(map(str, written))} ({output.kind}, {tuple(output.tensor().shape)}) in {elapsed:.2f} s")
    return 0


def _cmd_check(args) -> int:
    from .testing import KitOptions, Subject, format_table, run_checks
    from .testing.runner import failed, to_json

    subject = Subject(args.model, plugin=args.plugin)
    opts = KitOptions(max_examples=args.max_examples, usp_world=args.usp or 2)
    if not args.json:
        print(f"checking {subject.spec.name} ({subject.record.distribution}) ...", file=sys.stderr)

    def progress(result) -> None:
        if not args.json:
            print(f"  {result.id:<16} {result.status.upper():<6} {result.seconds:6.1f} s", file=sys.stderr)

    results = run_checks(subject, opts, pattern=args.k, on_result=progress)
    print(to_json(subject, results) if args.json else format_table(subject, results))
    return 1 if failed(results) else 0


def _read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"cannot read --image {path!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditkit", description="Accelerated diffusion-transformer inference, per-model plugins.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins, their models, hooks, versions and load errors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)

    r = sub.add_parser("run", help="generate with a registered model and write the result")
    r.add_argument("model", help="model name or alias (see 'ditkit plugins')")
    r.add_argument("--preset", default=None, help="preset name (default: the model's default, normally 'tiny')")
    r.add_argument("--weights", default=None, help="checkpoint directory in the model's official layout")
    r.add_argument("--prompt", default="a photo of a red fox in the snow")
    r.add_argument("--negative-prompt", default=None)
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--guidance-scale", type=float, default=None)
    r.add_argument("--height", type=int, default=None)
    r.add_argument("--width", type=int, default=None)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--num-frames", type=int, default=None, help="video models: frames to generate")
    r.add_argument("--image", default=None, help="image-conditioned models: the input image file")
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    r.add_argument("--compile", action="store_true", help="compile_pipeline() first and print its report")
    r.add_argument("--usp", action="store_true", help="sequence-parallel across the ranks of this torchrun job")
    r.add_argument("--nproc", type=int, default=0, help="launch N local processes (CPU: gloo) and run with --usp")
    r.add_argument("--out", default=None, help="output file (PNG for images, MP4 for video, WAV for audio)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("check", help="run the conformance kit on a registered model")
    c.add_argument("model", help="model name or alias")
    c.add_argument("--usp", type=int, default=2, metavar="N", help="ranks for the USP parity check (default 2)")
    c.add_argument("--json", action="store_true", help="machine-readable results")
    c.add_argument("-k", default=None, metavar="PATTERN", help="only checks whose id contains PATTERN (or matches a glob)")
    c.add_argument("--max-examples", type=int, default=3, help="Hypothesis size draws per shape check (default 3)")
    c.add_argument("--plugin", default=None, help="register this plugin module first (module or module:attr)")
    c.set_defaults(func=_cmd_check)

    from . import bench

    b = sub.add_parser("bench", help="time eager against compiled variants of a model (random weights, one process)")
    bench.add_arguments(b)
    b.set_defaults(func=bench.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DitkitError, ValueError) as exc:
        print(f"ditkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
