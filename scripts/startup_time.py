"""How long ``ditkit plugins`` takes to start against a bare ``python -c "import torch"``, in one run.

    python scripts/startup_time.py [--rounds 10] [--json FILE]

Each round runs every command once, in turn (round-robin), so a machine that gets busier or
quieter during the run affects each command alike. Prints min / median / max wall seconds per
command and the ratio of each median to the ``import torch`` median; the target is
``ditkit plugins`` within 1.6x. ``ditkit --help`` and a usage error are timed too (they read the
same declarations). The commands run the ``ditkit`` of this interpreter (``python -m core.cli``),
with the built-in plugins and whatever other plugins are installed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "ditkit plugins": [sys.executable, "-m", "core.cli", "plugins"],
    "ditkit --help": [sys.executable, "-m", "core.cli", "--help"],
    "ditkit run wan --steps abc (usage error)": [sys.executable, "-m", "core.cli", "run", "wan", "--steps", "abc"],
}
BASELINE = "python -c 'import torch'"
TARGET = ("ditkit plugins", 1.6)


def measure(rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for name, cmd in COMMANDS.items():  # one unmeasured run each: the file cache, .pyc files
        subprocess.run(cmd, capture_output=True, timeout=300)
    for _ in range(rounds):
        for name, cmd in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(cmd, capture_output=True, timeout=300)
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    import torch

    times = measure(args.rounds)
    base = statistics.median(times[BASELINE])
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "rounds": args.rounds}
    print(f"startup, {args.rounds} rounds round-robin; python {env['python']}, torch {env['torch']}, {env['processor']}")
    rows = []
    for name, ts in times.items():
        row = {"command": name, "min_s": min(ts), "median_s": statistics.median(ts), "max_s": max(ts),
               "median_vs_import_torch": statistics.median(ts) / base}
        rows.append(row)
        print(f"  {name:<42} min {row['min_s']:.2f}  median {row['median_s']:.2f}  max {row['max_s']:.2f} s"
              f"  {row['median_vs_import_torch']:.2f}x import torch")
    name, limit = TARGET
    ratio = next(r["median_vs_import_torch"] for r in rows if r["command"] == name)
    print(f"{name}: {ratio:.2f}x import torch (target <= {limit}x): {'met' if ratio <= limit else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": rows, "times_s": times}, f, indent=2)
    return 0 if ratio <= limit else 1


if __name__ == "__main__":
    sys.exit(main())
