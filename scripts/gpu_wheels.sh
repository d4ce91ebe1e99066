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
# (scripts/gpu_wheels_check.py, tested offline) fails if any declared requirement is in neither
# list. FlashAttention-4 is not carried: its nvidia-cutlass-dsl-libs-cu13 wheel alone is 92 MB,
# over the 64 MiB a device call carries.
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

# one version each, every declared requirement met, the size against the carry limit (no network)
noav=(); [ "$av" = 1 ] || noav=(--no-av)
"$python" scripts/gpu_wheels_check.py "$dir" --python-version "$pyver" ${noav[@]+"${noav[@]}"}
