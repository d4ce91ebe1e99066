#!/usr/bin/env bash
# The wheels the GPU machine lacks, for its image (CPython 3.12, x86-64 manylinux, with torch,
# triton, transformers and their needs), downloaded here where PyPI is reachable, plus ditkit's own
# wheel: `bash scripts/gpu_wheels.sh [--no-av] [DIR]` (DIR defaults to .whl, which git ignores).
# scripts/gpu_all.sh installs them there with `pip install --no-index --no-deps --target`.
#
# Exactly what the image lacks, each pinned (one version each: two stop pip's install):
#   pluggy                     ditkit's plugin manager (the image's pytest may bring one; ours shadows it)
#   pydantic, pydantic-core, annotated-types, typing-inspection
#                              ditkit's records
#   typing-extensions          pydantic needs >= 4.16; the image's version is not known, and a newer one
#                              is backward compatible
#   yunchang                   the USP engine
#   xfuser, distvae, diffusers xDiT's engine (`import xfuser` imports its pipelines, hence diffusers and distvae)
#   av                         MP4 writing only (35 MB); the benchmarks write no video: --no-av leaves it out
# Requirements the wheels declare but Python 3.12 never imports: importlib_metadata (diffusers
# imports it on Python < 3.8 only). Those the image holds: torch, triton, transformers, tokenizers,
# safetensors (0.8.0), huggingface-hub (1.33), numpy, pillow, tqdm, hypothesis, packaging, pyyaml,
# regex, requests, filelock, einops, accelerate, peft, sentencepiece, zipp. The check at the end
# fails if any declared requirement is in neither list. FlashAttention-4 is not carried: its
# nvidia-cutlass-dsl-libs-cu13 wheel alone is 92 MB, over the 64 MiB a device call carries.
#
# GPU_WHEELS_PYTHON=3.11 fetches the same set for another CPython (a by-hand check of the install
# on a CPU machine with that Python; the GPU image needs 3.12).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
av=1
if [ "${1:-}" = "--no-av" ]; then av=0; shift; fi
dir=${1:-.whl}
pyver=${GPU_WHEELS_PYTHON:-3.12}
python=${PYTHON:-python3}
pins=(pluggy==1.7.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      typing-extensions==4.16.0 yunchang==0.6.4 xfuser==0.7.0 distvae==0.1.0 diffusers==0.42.1)
[ "$av" = 1 ] && pins+=(av==19.0.2)

mkdir -p "$dir"
rm -f "$dir"/*.whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$pyver" \
  "${platforms[@]}" -d "$dir" "${pins[@]}"
"$python" -m pip wheel -q --no-deps -w "$dir" .

"$python" - "$dir" "$pyver" "$av" <<'EOF'
"""One version per distribution, every declared requirement met, and the size against the carry limit."""
import subprocess, sys, zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

folder, pyver, av = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
IMAGE = {"torch", "triton", "transformers", "tokenizers", "safetensors", "huggingface-hub", "numpy", "pillow", "tqdm",
         "hypothesis", "packaging", "pyyaml", "regex", "requests", "filelock", "einops", "accelerate", "peft",
         "sentencepiece", "zipp", "httpx"}
NEVER_IMPORTED = {"importlib-metadata": "diffusers imports it on Python < 3.8 only",
                  "beautifulsoup4": "xfuser's caption cleaning, not imported by `import xfuser`"}
if not av:
    NEVER_IMPORTED["av"] = "left out with --no-av: MP4 writing unavailable there (benchmarks write none)"
wheels = sorted(folder.glob("*.whl"))
names = {}
for w in wheels:
    name = canonicalize_name(w.name.split("-")[0])
    if name in names:
        sys.exit(f"gpu_wheels: two wheels of {name}: {names[name].name} and {w.name}")
    names[name] = w
env = {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux",
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
        if dep not in names and dep not in IMAGE and dep not in NEVER_IMPORTED:
            missing.append(f"{name} needs {req} (neither carried nor in the image)")
if missing:
    sys.exit("gpu_wheels: " + "\n  ".join(["requirements not met:", *missing]))
tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.split(b"\0")
tree = sum(Path(p.decode()).stat().st_size for p in tracked if p and Path(p.decode()).is_file())
total = sum(w.stat().st_size for w in wheels)
for w in wheels:
    print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
limit = 64 * 2**20
print(f"gpu_wheels: {len(wheels)} wheels, {total / 2**20:.1f} MiB; with the tracked tree ({tree / 2**20:.1f} MiB) "
      f"{(total + tree) / 2**20:.1f} MiB of the 64 MiB a device call carries")
if total + tree > limit:
    sys.exit("gpu_wheels: over the carry limit; rerun with --no-av")
EOF
