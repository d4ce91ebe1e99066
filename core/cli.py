"""The ``ditkit`` command: ``plugins``, ``run``, ``check``, ``bench``."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict

from .cli_warnings import warnings_as_lines
from .errors import DitkitError, InputError, Interrupted, PluginError, RankFailed
from .jsonreport import STDOUT, add_json_argument, write_json


def _cmd_plugins(args) -> int:
    from .registry import get_registry

    registry = get_registry()
    plugins = [asdict(p) for p in registry.plugins()]
    failures = [asdict(f) for f in registry.failures]
    models = {
        r.spec.name: {"plugin": r.plugin, "distribution": r.distribution, "aliases": r.spec.aliases,
                      "presets": sorted(r.spec.presets), "default_preset": r.spec.default_preset,
                      "output": r.spec.capabilities.output}
        for r in registry.models()
    }
    if args.json:
        from .sizes import sizes_report

        for r in registry.models():
            models[r.spec.name]["sizes"] = sizes_report(r.spec)
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
            presets = ", ".join(f"{n} (default)" if n == info["default_preset"] else n for n in info["presets"])
            print(f"  model:  {m}{aliases}  presets: {presets}  output: {info['output']}")
    for f in failures:
        print(f"{f['plugin']}  ({f['distribution']})  FAILED TO LOAD: {f['error']}")
    return 0


def _generation_args(args) -> dict:
    gen = {k: v for k, v in (("num_inference_steps", args.steps), ("height", args.height), ("width", args.width),
                             ("guidance_scale", args.guidance_scale), ("negative_prompt", args.negative_prompt),
                             ("num_frames", args.num_frames), ("shift", args.shift)) if v is not None}
    if args.image is not None:
        gen["image"] = _read_image(args.image)
    return gen


def _preflight(args) -> str:
    """Every check that needs no model weights, before any work (and, with ``--nproc``, before any
    rank is spawned): the model, its preset, the device and dtype, the output path and format, and
    the generation arguments (against the pipeline built on the meta device). Returns the output path."""
    from .loading import check_call
    from .outputs import check_output_path, default_output_name
    from .registry import get_registry

    if args.nproc is not None and args.nproc < 0:
        raise InputError(f"--nproc must be a positive number of processes, got {args.nproc}")
    if args.shard_weights and not (args.usp or (args.nproc or 0) > 1):
        raise InputError("--shard-weights shards the weights over the USP ranks: add --nproc N (or --usp under torchrun)")
    from .offload import shards_conflict

    if args.shard_weights and (reason := shards_conflict(args.offload)):
        raise InputError(f"--offload {args.offload} cannot be combined with --shard-weights: {reason}; use "
                         f"--offload block with --shard-weights, or --offload {args.offload} without it")
    from .fp8_weights import resolve_weight_dtype

    if resolve_weight_dtype(args.weight_dtype) is not None and args.shard_weights:
        raise InputError(f"--weight-dtype {args.weight_dtype} cannot be combined with --shard-weights yet (fp8 "
                         f"storage is not sharded); use one of them")
    spec = get_registry().model(args.model).spec
    kind = spec.capabilities.output
    out = args.out or default_output_name(spec.name, kind)
    check_output_path(out, kind)
    _check_wav(args, kind)
    meta = check_call(args.model, preset=args.preset, weights=args.weights, device=args.device, dtype=args.dtype,
                      prompt=args.prompt, seed=args.seed, offload=args.offload, **_generation_args(args))
    from .declarations import check_declarations

    # what the plugin declares for compile and USP, against the model built on the meta device
    check_declarations(meta, compile=bool(args.compile or args.compile_cache), usp=bool(args.usp or (args.nproc or 0) > 1))
    if args.lora:
        from .lora import check_lora_args

        check_lora_args(spec, args.lora)
    return out


def _check_wav(args, kind: str) -> None:
    from .outputs import check_output_path

    if args.wav is None:
        return
    if "audio" not in kind:
        raise InputError(f"--wav writes the audio track, but {args.model!r} generates {kind} output without audio")
    check_output_path(args.wav, "audio")


def _cmd_run(args) -> int:
    import core

    # a rank of --nproc (``--usp`` without ``--nproc``) runs after its launcher's preflight; under
    # torchrun the main rank checks the output path below, after the model is known to load
    out = _preflight(args) if (args.nproc or 0) > 1 or not args.usp else None
    argv = sys.argv[1:] if args.argv is None else args.argv
    if args.compile_cache:  # checked before any work: a folder that cannot be written is one warning
        from .compile_cache import check_compile_caches
        from .cli_flags import without_option

        if check_compile_caches(args.compile_cache) is None:
            args.compile, args.compile_cache = True, None
            argv = [*without_option(argv, "--compile-cache"), "--compile"]  # the ranks do as the launcher decided
    elif args.compile:
        from .compile_cache import check_compile_caches

        check_compile_caches(None)
    if args.nproc and args.nproc > 1:
        from .parallel.launch import relaunch_cli

        return relaunch_cli(args.nproc, argv, entry=_rank_main)
    options = {}
    if args.usp:
        options.update(use_usp=True, shard_weights=args.shard_weights)
    if args.offload:
        options.update(offload=args.offload)
    pipe = core.load(args.model, preset=args.preset, weights=args.weights, device=args.device, dtype=args.dtype,
                     weight_dtype=args.weight_dtype, **options)
    is_main = pipe.parallel is None or pipe.parallel.is_main
    if pipe.offload is not None and is_main:
        print(pipe.offload)
    if is_main and pipe.parallel is not None and pipe.parallel.weight_shards is not None:
        print(pipe.parallel.weight_shards)
    if is_main and pipe.lossy:
        print(f"lossy: {pipe.lossy}")
    for text in args.lora or ():
        from .lora import parse_lora_arg

        path, scale, component = parse_lora_arg(text)
        report = pipe.load_lora(path, scale, component=component)
        if is_main:
            print(report)
    if out is None:
        from .outputs import check_output_path, default_output_name

        out = args.out or default_output_name(pipe.spec.name, pipe.spec.capabilities.output)
        if is_main:
            check_output_path(out, pipe.spec.capabilities.output)
            _check_wav(args, pipe.spec.capabilities.output)
    if args.compile or args.compile_cache:
        report = pipe.compile_pipeline(cache_dir=args.compile_cache)
        if is_main:
            print(report)
            if report.bundle_loaded:
                print(f"loaded compile cache {report.bundle_loaded}")
    gen = _generation_args(args)
    start = time.perf_counter()
    output = pipe(args.prompt, seed=args.seed, progress=False if args.no_progress else None, **gen)
    elapsed = time.perf_counter() - start
    if is_main:
        written = core.write_output(output, out)
        if args.wav is not None:
            written += core.write_output(core.Output(kind="audio", audio=output.audio, sample_rate=output.sample_rate),
                                         args.wav)
        print(f"wrote {', '.join(map(str, written))} ({output.kind}, {tuple(output.tensor().shape)}) in {elapsed:.2f} s")
    if args.compile_cache and is_main:  # after the output: a cache problem never costs the result
        _save_compile_cache(pipe)
    return 0


def _save_compile_cache(pipe) -> None:
    """Save the bundle after the generation (it holds what the run compiled); failing is a warning."""
    import warnings

    from .compile_cache import CompileCacheWarning

    try:
        saved = pipe.save_compile_cache()
    except OSError as exc:
        warnings.warn(f"compile cache not saved: {exc.strerror or exc} ({exc.filename or ''})", CompileCacheWarning)
        return
    if saved:
        print(f"saved compile cache {saved}")


def _cmd_check(args) -> int:
    from .testing import KitOptions, Subject, format_table, run_checks
    from .testing.runner import failed, to_json

    try:
        subject = Subject(args.model, plugin=args.plugin)
    except PluginError as exc:
        if args.plugin is None:
            raise
        raise PluginError(f"--plugin {args.plugin}: {exc}") from exc
    opts = KitOptions(max_examples=args.max_examples, usp_world=args.usp or 2, strict=args.strict)
    if args.json != STDOUT:
        print(f"checking {subject.spec.name} ({subject.record.distribution}) ...", file=sys.stderr)

    # On a terminal the progress line is rewritten in place and cleared before the table, so
    # each result is shown once; piped, progress goes to stderr and the table to stdout.
    live = args.json != STDOUT and sys.stderr.isatty() and sys.stdout.isatty()

    def progress(result) -> None:
        if args.json == STDOUT:
            return
        line = f"  {result.id:<16} {result.status.upper():<6} {result.seconds:6.1f} s"
        if live:
            print(f"\r{line:<60}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr)

    results = run_checks(subject, opts, pattern=args.k, on_result=progress)
    if live:
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
    if args.json != STDOUT:
        print(format_table(subject, results))
    if args.json:
        write_json(to_json(subject, results), args.json)
    return 1 if failed(results) else 0


def _read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"cannot read --image {path!r}: {exc}") from None


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one ``ditkit: error:`` line, exit status 2 (argparse
    prints the usage first; ``-h`` still shows it)."""

    def error(self, message: str):
        sub = self.prog[len("ditkit"):].strip()
        self.exit(2, f"ditkit: error: {sub + ': ' if sub else ''}{message} (see '{self.prog} -h')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ditkit", description="Accelerated diffusion-transformer inference, per-model plugins.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins, their models, hooks, versions and load errors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plugins)

    r = sub.add_parser("run", help="generate with a registered model and write the result")
    r.add_argument("model", help="model name or alias (see 'ditkit plugins')")
    r.add_argument("--preset", default=None, help="preset name (default: the model's default, normally 'tiny')")
    r.add_argument("--weights", default=None, help="checkpoint directory in the model's official layout")
    r.add_argument("--prompt", default="a photo of a red fox in the snow", help="the text prompt (default: %(default)r)")
    r.add_argument("--negative-prompt", default=None, help="what to steer away from (default: the preset's)")
    r.add_argument("--steps", type=int, default=None, help="denoising steps, num_inference_steps (default: the preset's)")
    r.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale (default: the preset's)")
    r.add_argument("--height", type=int, default=None, help="output height in pixels (default: the preset's)")
    r.add_argument("--width", type=int, default=None, help="output width in pixels (default: the preset's)")
    r.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: %(default)s)")
    r.add_argument("--shift", type=float, default=None,
                   help="models with a shift argument (Wan, Qwen-Image): the schedule's shift (few-step LoRAs, docs/models.md)")
    r.add_argument("--num-frames", type=int, default=None, help="video models: frames to generate (default: the preset's)")
    r.add_argument("--image", default=None, help="image-conditioned models: the input image file")
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    r.add_argument("--lora", action="append", default=None, metavar="[COMPONENT=]FILE[:SCALE]",
                   help="load a LoRA (repeatable; SCALE default 1; COMPONENT for models with several, e.g. dit_low=)")
    r.add_argument("--compile", action="store_true", help="compile_pipeline() first and print its report")
    r.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="compile, loading the matching portable compile-cache bundle from DIR; save it after the run")
    r.add_argument("--offload", default=None, choices=["model", "block", "disk", "auto"],
                   help="keep weights off the device until the call that uses them: per component (model), per "
                        "repeated block (block), blocks memory-mapped in the --weights files (disk), or the least "
                        "that fits (auto); with --shard-weights only block")
    r.add_argument("--usp", action="store_true", help="sequence-parallel across the ranks of this torchrun job")
    r.add_argument("--nproc", type=int, default=0, help="launch N local processes (CPU: gloo) and run with --usp")
    r.add_argument("--shard-weights", action="store_true",
                   help="with --nproc/--usp: each rank keeps 1/N of the DiT and gathers a block just before it runs")
    r.add_argument("--weight-dtype", default=None, metavar="float8_e4m3fn",
                   help="store linear weights in fp8 and cast per call (half of bf16's memory; lossy, opt-in)")
    r.add_argument("--out", default=None, help="output file: PNG for images, MP4 for video, WAV for audio "
                   "(default: MODEL.png/.mp4/.wav in the current folder, e.g. wan2.1-t2v-1.3b.mp4)")
    r.add_argument("--wav", default=None, metavar="FILE", help="video+audio models: also write the audio track as WAV")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("check", help="run the conformance kit on a registered model")
    c.add_argument("model", help="model name or alias")
    c.add_argument("--usp", type=int, default=2, metavar="N", help="ranks for the USP parity check (default 2)")
    add_json_argument(c)
    c.add_argument("-k", default=None, metavar="PATTERN", help="only checks whose id contains PATTERN (or matches a glob)")
    c.add_argument("--max-examples", type=int, default=3, help="Hypothesis size draws per shape check (default 3)")
    c.add_argument("--plugin", default=None, help="register this plugin module first (module or module:attr)")
    c.add_argument("--strict", action="store_true",
                   help="fail reference-parity when fidelity is unproven (no Conformance.reference, or its package missing)")
    c.set_defaults(func=_cmd_check)

    from . import bench

    b = sub.add_parser("bench", help="time eager against compiled variants of a model (random weights, one process)")
    bench.add_arguments(b)
    b.set_defaults(func=bench.main)
    return parser


def _one_line(exc: BaseException) -> str:
    """The error as one line; a rank's failure as that rank's own error (``DITKIT_DEBUG=1``: all)."""
    if isinstance(exc, RankFailed):
        cause = exc.__cause__
        if cause is None and (exc.error_type == "exit" or exc.error_type.startswith("signal")):
            text = str(exc).split("\n", 1)[0]  # "rank 1 was killed by SIGKILL (...); as a consequence ..."
        else:
            text = str(cause) if cause is not None else str(exc).split("\n", 1)[0].split(": ", 1)[-1]
            text = f"rank {exc.rank}: {text}"
        if os.environ.get("DITKIT_DEBUG"):
            return f"{text}\n{exc.remote_traceback}"
    else:
        text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split()) if not os.environ.get("DITKIT_DEBUG") else text


def _rank_main(argv: list[str]) -> int:
    """One rank of ``--nproc``: errors are raised, and the launcher reports the first failing rank in one line."""
    return main(argv, raise_errors=True)


def _on_sigterm(signum, frame):
    raise Interrupted("terminated (SIGTERM)", signum)


def main(argv: list[str] | None = None, *, raise_errors: bool = False) -> int:
    """The ``ditkit`` command. Every user error is one ``ditkit: error:`` line and exit status 2;
    Ctrl-C exits 130 and SIGTERM 143, each after the temporary output file is removed.
    ``raise_errors`` (a rank of ``--nproc``) lets errors reach the launcher, which prints one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    previous = None
    if not raise_errors:
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread: leave the default
            pass
    try:
        with warnings_as_lines():
            return args.func(args)
    except Interrupted as exc:
        if raise_errors:
            raise
        print(f"ditkit: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        if raise_errors:
            raise
        print("ditkit: interrupted", file=sys.stderr)
        return 130
    except (DitkitError, ValueError) as exc:
        if raise_errors:
            raise
        text = _one_line(exc)
        if isinstance(exc, InputError) and args.command == "run":
            from .cli_flags import in_flag_terms

            text = in_flag_terms(text)  # the flag the user typed (--steps), not the Python argument
        print(f"ditkit: error: {text}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
