"""The checks ``scripts/gpu_wheels.sh`` runs on the wheels it downloaded, before they are carried:

    python scripts/gpu_wheels_check.py DIR [--python-version 3.12] [--no-av] [--limit-mib 64]

One wheel per distribution (two versions stop pip's install), every requirement a wheel declares
for that Python met by another wheel or by the GPU image (:data:`IMAGE`) or never imported
(:data:`NEVER_IMPORTED`), and the wheels with the checkout's tracked files within the 64 MiB a
device call carries. Needs no network: it reads the wheels' ``METADATA`` (a CI test runs it on
small wheels it builds).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
IMAGE = {"torch", "triton", "transformers", "tokenizers", "safetensors", "huggingface-hub", "numpy", "pillow", "tqdm",
         "hypothesis", "packaging", "pyyaml", "regex", "requests", "filelock", "einops", "accelerate", "peft",
         "sentencepiece", "zipp", "httpx"}
"""What the GPU image already holds."""
NEVER_IMPORTED = {"importlib-metadata": "diffusers imports it on Python < 3.8 only",
                  "beautifulsoup4": "xfuser's caption cleaning, not imported by `import xfuser`"}
CARRY_LIMIT_MIB = 64


def one_per_distribution(wheels: list[Path]) -> dict[str, Path]:
    """Distribution -> its wheel; ``ValueError`` naming both when one has two."""
    names: dict[str, Path] = {}
    for w in wheels:
        name = canonicalize_name(w.name.split("-")[0])
        if name in names:
            raise ValueError(f"two wheels of {name}: {names[name].name} and {w.name}")
        names[name] = w
    return names


def unmet_requirements(names: dict[str, Path], python_version: str, av: bool) -> list[str]:
    """Each requirement a wheel declares for ``python_version`` on Linux x86-64 that nothing provides."""
    never = dict(NEVER_IMPORTED)
    if not av:
        never["av"] = "left out with --no-av: MP4 writing unavailable there (benchmarks write none)"
    env = {"python_version": python_version, "python_full_version": python_version + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
    missing = []
    for name, w in names.items():
        with zipfile.ZipFile(w) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = canonicalize_name(req.name)
            if dep not in names and dep not in IMAGE and dep not in never:
                missing.append(f"{name} needs {req} (neither carried nor in the image)")
    return missing


def tracked_bytes(root: Path = ROOT) -> int:
    """The size of the checkout's tracked files (a device call carries them with the wheels)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True, cwd=root).stdout.split(b"\0")
    return sum((root / p.decode()).stat().st_size for p in tracked if p and (root / p.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--no-av", action="store_true")
    parser.add_argument("--limit-mib", type=float, default=CARRY_LIMIT_MIB)
    args = parser.parse_args(argv)
    wheels = sorted(args.folder.glob("*.whl"))
    try:
        names = one_per_distribution(wheels)
    except ValueError as e:
        sys.exit(f"gpu_wheels: {e}")
    missing = unmet_requirements(names, args.python_version, av=not args.no_av)
    if missing:
        sys.exit("gpu_wheels: " + "\n  ".join(["requirements not met:", *missing]))
    tree = tracked_bytes()
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"gpu_wheels: {len(wheels)} wheels, {total / 2**20:.1f} MiB; with the tracked tree ({tree / 2**20:.1f} MiB) "
          f"{(total + tree) / 2**20:.1f} MiB of the {args.limit_mib:g} MiB a device call carries")
    if total + tree > args.limit_mib * 2**20:
        sys.exit("gpu_wheels: over the carry limit; rerun with --no-av")
    return 0


if __name__ == "__main__":
    sys.exit(main())
