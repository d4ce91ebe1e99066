"""Every GPU row in one call, inside a time budget: ``bash scripts/gpu_all.sh [options] OUTDIR``.

Stages, in order of value, each a separate process with its own time limit:

1. ``install``: the project and its missing dependencies from the wheels of ``.whl/``
   (``scripts/gpu_wheels.sh`` downloads them), ``pip install --no-index --no-deps --target``
   into a folder put on ``PYTHONPATH``, so the image's torch, triton and transformers are used;
   never downloads. With ``--device cpu`` the current environment is used instead (and the
   summary says so), unless ``--wheels DIR`` is given;
2. ``smoke_usp``: ``scripts/gpu_smoke_usp.py`` (under ``torchrun`` on a GPU, so the engine rows run);
3. ``bench_wan13``, ``bench_qwen``, ``bench_wan14``: ``ditkit bench`` for the three GPU rows of
   docs/PERFORMANCE.md at their real configs, random weights, bf16;
4. ``attention``: ``scripts/attention_kernels.py`` (cuDNN, flash and efficient SDPA, and ``fa4``
   where flash-attn-4 imports; exact against SDPA math in float32 before timed);
5. ``offload``: ``scripts/offload_gpu.py``'s parity, step and memory parts (``OFFLOAD_PARTS``; its
   compile part is left to a call of its own: compiling costs the GPU minutes that the rows need).

The whole run ends within ``--budget`` seconds (default 480: 8 minutes). A stage starts only if
the budget still holds its ``need`` (the least time in which it can finish); it then runs with
``min(limit, budget left)``, and is killed (its whole process group) at that limit. A stage that
would not fit is skipped and recorded; one that fails or runs over is recorded; the run goes on.

OUTDIR receives exactly these files (the device tool brings back at most 8): ``summary.json``
(rewritten after every stage, so a killed run still leaves one), ``gpu_all.log`` (every stage's
output), and one row file per stage after the install: ``smoke_usp.json``, ``bench_wan13.json``,
``bench_qwen.json``, ``bench_wan14.json``, ``attention.json``, ``offload.json``. A row file holds
the JSON the stage's own command wrote, untouched; when it wrote none (skipped, failed, killed),
a record of why.

``--device cpu --tiny`` runs the same stages at tiny presets (1 measured step, eager only: a
CPU compiles for minutes) with the same budget logic and files; a CI test runs it.
Exit status: 0 when no stage failed or ran over, 1 otherwise, 2 for a usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
OFFLOAD_SCRIPT = SCRIPTS / "offload_gpu.py"
# offload_gpu.py's parts, in its order: parity (tiny presets: the same on both devices), then the
# Wan 1.3B block step time (the 1.3x target), then peak device memory of Wan 14B and MOVA-360p
# (the slowest: tens of GB of random weights built in host memory). The script rewrites its JSON
# after each part, so a stage killed at its limit keeps the parts it finished.
OFFLOAD_PARTS = "parity,step,memory"
OFFLOAD_GPU_ARGS = ["--steps", "3", "--frames", "17"]
OFFLOAD_TINY_ARGS = ["--steps", "1"]  # --tiny: 5 frames in 'memory', whatever --frames says
DEFAULT_BUDGET_S = 480.0
RESERVE_S = 3.0
"""Kept back from every stage's limit for writing the summary."""
KILL_GRACE_S = 10.0


@dataclass
class Stage:
    name: str
    description: str
    limit_s: float  # on a GPU
    need_s: float  # the least budget worth starting it with, on a GPU
    row: str | None  # the JSON file its command writes into OUTDIR
    tiny_limit_s: float = 120.0
    tiny_need_s: float = 1.0


STAGES = [
    Stage("install", "the project and its missing dependencies from .whl/ (no network)", 90, 10, None),
    Stage("smoke_usp", "USP engine numerics: kernel LSE, ring merge, engine at DiT shapes", 90, 20, "smoke_usp.json"),
    Stage("bench_wan13", "Wan2.1-1.3B, 832x480x81, bf16: eager / regional / whole", 210, 90, "bench_wan13.json"),
    Stage("bench_qwen", "Qwen-Image, 1328x1328, bf16: eager / regional", 150, 60, "bench_qwen.json"),
    Stage("bench_wan14", "Wan2.1-14B DiT, 832x480x81, CFG on, one step, bf16: regional", 150, 75, "bench_wan14.json"),
    Stage("attention", "attention kernels per shape: SDPA cuDNN / flash / efficient, fa4; exact before timed",
          90, 30, "attention.json"),
    Stage("offload", "offload modes: parity, block step time against resident, peak device memory per mode",
          240, 45, "offload.json"),
]
STAGE_NAMES = [s.name for s in STAGES]

# ditkit bench rows: (model, GPU arguments, tiny arguments). The GPU arguments are the rows of
# docs/PERFORMANCE.md; tiny runs the tiny preset eagerly for one measured step.
BENCH_ROWS = {
    "bench_wan13": ("wan2.1-t2v-1.3b",
                    ["--preset", "official", "--height", "480", "--width", "832", "--num-frames", "81",
                     "--dtype", "bf16", "--compare", "eager,regional,whole", "--steps", "3", "--warmup", "1"],
                    ["--compare", "eager", "--steps", "1", "--warmup", "1"]),
    "bench_qwen": ("qwen-image",
                   ["--preset", "official", "--height", "1328", "--width", "1328", "--dtype", "bf16",
                    "--compare", "eager,regional", "--steps", "3", "--warmup", "1"],
                   ["--compare", "eager", "--steps", "1", "--warmup", "1"]),
    "bench_wan14": ("wan2.1-t2v-14b",
                    ["--preset", "official", "--height", "480", "--width", "832", "--num-frames", "81",
                     "--guidance-scale", "5.0", "--dtype", "bf16", "--compare", "regional", "--steps", "1",
                     "--warmup", "1"],
                    ["--guidance-scale", "5.0", "--compare", "eager", "--steps", "1", "--warmup", "1"]),
}

VERIFY = """
import importlib, sys
import core, pluggy, pydantic, safetensors, yunchang
from core.registry import get_registry
registry = get_registry()
print("ditkit from", core.__file__)
print("models:", ", ".join(sorted(m.spec.name for m in registry.models())))
print("attention kernels:", ", ".join(core.attention.available_kernels()))
for name, why in () if "--required-only" in sys.argv else (("av", "MP4 writing"), ("diffusers", "xfuser's pipelines"), ("xfuser", "xDiT's engine")):
    try:
        importlib.import_module(name)
        print(f"optional {name}: imports")
    except Exception as e:
        print(f"optional {name} ({why}): does not import: {type(e).__name__}: {e}")
"""


@dataclass
class Context:
    out: Path
    device: str
    tiny: bool
    python: str
    work: Path
    wheels: Path | None  # None: use the current environment
    site: Path
    env: dict = field(default_factory=dict)


def wheel_files(folder: Path) -> list[Path]:
    """The wheels of ``folder``; two versions of one distribution would make pip refuse them all."""
    wheels = sorted(folder.glob("*.whl"))
    seen: dict[str, Path] = {}
    for w in wheels:
        dist = w.name.split("-")[0].lower().replace("_", "-")
        if dist in seen:
            raise ValueError(f"two wheels of {dist} in {folder}: {seen[dist].name} and {w.name}; keep one")
        seen[dist] = w
    return wheels


def command(stage: Stage, ctx: Context) -> list[str]:
    """The stage's command line (run from ``ctx.work``, scripts by absolute path)."""
    py, out = ctx.python, ctx.out
    if stage.name == "install":
        if ctx.wheels is None:  # the current environment: only what the stages need
            return [py, "-c", VERIFY, "--required-only"]
        wheels = [str(w) for w in wheel_files(ctx.wheels)]
        if not wheels:
            raise ValueError(f"no wheels in {ctx.wheels}: run `bash scripts/gpu_wheels.sh` on a machine with PyPI")
        install = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                   "--upgrade", "--target", str(ctx.site), *wheels]
        return ["bash", "-c", f"{shlex.join(install)} && {shlex.join([py, '-c', VERIFY])}"]
    if stage.name == "smoke_usp":
        script = str(SCRIPTS / "gpu_smoke_usp.py")
        if ctx.tiny or ctx.device == "cpu":
            return [py, script, "--device", ctx.device, *(["--small"] if ctx.tiny else []), "--json", str(out / stage.row)]
        return [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", script,
                "--json", str(out / stage.row)]
    if stage.name in BENCH_ROWS:
        model, gpu_args, tiny_args = BENCH_ROWS[stage.name]
        return [py, "-m", "core.cli", "bench", model, "--device", ctx.device, *(tiny_args if ctx.tiny else gpu_args),
                "--json", str(out / stage.row), "--no-progress"]
    if stage.name == "attention":
        return [py, str(SCRIPTS / "attention_kernels.py"), "--device", ctx.device, *(["--tiny"] if ctx.tiny else []),
                "--json", str(out / stage.row)]
    if stage.name == "offload":
        return [py, str(OFFLOAD_SCRIPT), "--device", ctx.device, *(["--tiny"] if ctx.tiny else []),
                "--only", OFFLOAD_PARTS, *(OFFLOAD_TINY_ARGS if ctx.tiny else OFFLOAD_GPU_ARGS), "--json", str(out / stage.row)]
    raise KeyError(stage.name)


def run_process(cmd: list[str], timeout: float, log, env: dict, cwd: Path) -> tuple[int | None, bool]:
    """``(exit status, timed out)``; output appended to ``log``; on timeout the process group is killed."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        return proc.wait(timeout=max(timeout, 0.0)), False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return proc.returncode, True
    except BaseException:  # Ctrl-C or SIGTERM of the whole run: take the stage down with it
        _kill_group(proc)
        raise


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def log_tail(path: Path, start: int, lines: int = 15) -> str:
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="gpu_all.sh", description=__doc__.splitlines()[0])
    p.add_argument("outdir", help="folder for summary.json, gpu_all.log and one JSON per row")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny presets and shapes (a CPU run of the same stages)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run (default 480)")
    p.add_argument("--wheels", default=None, metavar="DIR",
                   help="install from these wheels (default on cuda: .whl of the checkout; on cpu: use the current environment)")
    p.add_argument("--only", default=None,
                   help="comma-separated stages to run, install always included (the others are recorded as not selected)")
    p.add_argument("--skip", default=None, help="comma-separated stages not to run")
    p.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS", help="override a stage's time limit")
    p.add_argument("--fail", action="append", default=[], metavar="STAGE",
                   help="make a stage fail on purpose (its command is replaced by one that exits 1): tests the recording")
    p.add_argument("--plan", action="store_true", help="print the stages, limits and commands as JSON; run nothing")
    args = p.parse_args(argv)

    def stages(value, flag):
        names = [n.strip() for n in value.split(",") if n.strip()] if value else []
        bad = [n for n in names if n not in STAGE_NAMES]
        if bad:
            p.error(f"{flag}: unknown stage(s) {', '.join(bad)}; stages: {', '.join(STAGE_NAMES)}")
        return names

    args.only, args.skip = stages(args.only, "--only"), stages(args.skip, "--skip")
    args.fail = stages(",".join(args.fail), "--fail")
    limits = {}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        stages(name, "--limit")
        try:
            limits[name] = float(seconds)
        except ValueError:
            p.error(f"--limit {item!r}: expected STAGE=SECONDS")
    args.limit = limits
    if not args.budget >= 0:
        p.error(f"--budget must be a number of seconds >= 0, got {args.budget}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget
    out = Path(args.outdir).resolve()
    wheels = Path(args.wheels).resolve() if args.wheels else (None if args.device == "cpu" else ROOT / ".whl")
    work = Path(tempfile.mkdtemp(prefix="ditkit-gpu-all-"))
    ctx = Context(out=out, device=args.device, tiny=args.tiny, python=sys.executable, work=work, wheels=wheels,
                  site=work / "site")
    # no network there: nothing may wait on the Hugging Face hub
    env = dict(os.environ, PYTHONUNBUFFERED="1", DITKIT_COMPILE_CACHE=str(work / "compile-cache"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if wheels is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(ctx.site), *filter(None, [os.environ.get("PYTHONPATH")])])
    ctx.env = env

    if args.plan:
        plan = []
        for s in STAGES:
            try:
                cmd = command(s, ctx)
            except ValueError as e:
                cmd = f"error: {e}"
            plan.append({"stage": s.name, "limit_s": args.limit.get(s.name, s.tiny_limit_s if args.tiny else s.limit_s),
                         "need_s": s.tiny_need_s if args.tiny else s.need_s, "row": s.row, "command": cmd})
        print(json.dumps({"device": args.device, "tiny": args.tiny, "budget_s": args.budget, "stages": plan}, indent=2))
        shutil.rmtree(work, ignore_errors=True)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu_all.log"
    summary = {
        "device": args.device, "tiny": args.tiny, "budget_s": args.budget,
        "install": ("current environment (--device cpu: nothing installed from wheels)" if wheels is None
                    else f"wheels from {wheels}, installed with pip --no-index into {ctx.site}"),
        "mode": ("tiny presets and shapes, eager only (a CPU compiles for minutes), 1 measured step" if args.tiny
                 else "real configs, random weights, bf16"),
        "python": sys.executable, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": [],
        "finished": False,
    }
    print(f"gpu_all: device {args.device}{' (tiny)' if args.tiny else ''}, budget {args.budget:.0f} s, "
          f"{summary['install']}; output in {out}", flush=True)
    failed = False

    def terminated(signum, frame):  # the device tool's limit: stop the stage, keep the summary
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        with open(log_path, "w") as log:
            for stage in STAGES:
                record = run_stage(stage, ctx, args, deadline, log, log_path)
                failed |= record["status"] in ("failed", "timeout")
                summary["stages"].append(record)
                summary["elapsed_s"] = round(time.monotonic() - started, 1)
                write_json(out / "summary.json", summary)
                print(f"gpu_all: {stage.name:<12} {record['status']:<16} {record.get('elapsed_s', 0):7.1f} s  "
                      f"{record.get('reason', '')}", flush=True)
                if record["status"] in ("failed", "timeout") and record.get("tail"):
                    print("  | " + record["tail"].replace("\n", "\n  | "), flush=True)
        summary["finished"] = True
    finally:
        summary["elapsed_s"] = round(time.monotonic() - started, 1)
        counts = {}
        for r in summary["stages"]:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        summary["counts"] = counts
        write_json(out / "summary.json", summary)
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_all: {summary['elapsed_s']:.0f} s of {args.budget:.0f}; "
          + ", ".join(f"{n} {s}" for s, n in summary["counts"].items()), flush=True)
    return 1 if failed else 0


def run_stage(stage: Stage, ctx: Context, args, deadline: float, log, log_path: Path) -> dict:
    limit = args.limit.get(stage.name, stage.tiny_limit_s if ctx.tiny else stage.limit_s)
    need = min(stage.tiny_need_s if ctx.tiny else stage.need_s, limit)
    left = deadline - time.monotonic() - RESERVE_S
    record = {"stage": stage.name, "description": stage.description, "row": stage.row,
              "budget_left_s": round(max(left, 0.0), 1), "need_s": need}
    row_path = ctx.out / stage.row if stage.row else None
    if row_path is not None and row_path.exists():
        row_path.unlink()  # never report an earlier run's numbers as this one's

    def finish(status, reason, **extra):
        record.update(status=status, reason=reason, **extra)
        if row_path is not None and not row_path.exists():
            write_json(row_path, {"stage": stage.name, "status": status, "reason": reason,
                                  **{k: v for k, v in extra.items() if k in ("command", "returncode", "tail")}})
        log.write(f"=== {stage.name}: {status}: {reason}\n")
        log.flush()
        return record

    # --only keeps the install: on a fresh machine nothing else runs without it
    if (args.only and stage.name not in args.only and stage.name != "install") or stage.name in args.skip:
        return finish("not-selected", "left out by --only/--skip")
    if left < need:
        return finish("skipped-for-time", f"needs {need:g} s to be worth starting, {max(left, 0):.0f} s of the budget left")
    try:
        cmd = command(stage, ctx)
    except ValueError as e:
        return finish("failed", str(e))
    if stage.name in args.fail:
        cmd = [ctx.python, "-c", f"raise SystemExit('forced failure of stage {stage.name} (--fail)')"]
    timeout = min(limit, left)
    record.update(limit_s=round(timeout, 1), command=shlex.join(cmd))
    log.write(f"=== {stage.name}: {stage.description}\n=== limit {timeout:.1f} s; {shlex.join(cmd)}\n")
    log.flush()
    start_offset = log.tell()
    t0 = time.monotonic()
    rc, timed_out = run_process(cmd, timeout, log, ctx.env, ctx.work)
    log.flush()
    elapsed = round(time.monotonic() - t0, 1)
    tail = log_tail(log_path, start_offset)
    if timed_out:
        return finish("timeout", f"killed at its limit of {timeout:.1f} s", elapsed_s=elapsed, returncode=rc,
                      command=shlex.join(cmd), tail=tail)
    if rc != 0:
        return finish("failed", f"exit status {rc}", elapsed_s=elapsed, returncode=rc, command=shlex.join(cmd), tail=tail)
    if row_path is not None and not row_path.exists():
        return finish("failed", f"exit status 0 but no {stage.row} written", elapsed_s=elapsed, returncode=rc,
                      command=shlex.join(cmd), tail=tail)
    return finish("passed", "" if ctx.wheels is not None or stage.name != "install"
                  else "used the current environment (no wheels installed)", elapsed_s=elapsed, returncode=rc)


if __name__ == "__main__":
    sys.exit(main())
