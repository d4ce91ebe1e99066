#!/usr/bin/env bash
# The CPU figures of docs/PERFORMANCE.md, in one run: `bash scripts/bench_cpu.sh [OUT_DIR]`.
# 1 thread (OMP_NUM_THREADS=1); every compile cache used here is a fresh folder under OUT_DIR.
set -euo pipefail
out=${1:-docs/bench}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
unset TORCHINDUCTOR_CACHE_DIR
bench() { ditkit bench "$@" --no-progress; }

# 1. eager / regional / whole-DiT compile, same process, same weights (Wan small: 450 tokens)
DITKIT_COMPILE_CACHE=$work/c1 bench wan --preset small --compare eager,regional,whole --steps 5 --json "$out/cpu-wan-small.json"
# 2. warm start: the same regional compile in a second process finds the first one's kernels
DITKIT_COMPILE_CACHE=$work/c2 bench wan --preset small --compare regional --steps 3 --json "$out/cpu-wan-small-cold.json"
DITKIT_COMPILE_CACHE=$work/c2 bench wan --preset small --compare regional --steps 3 --json "$out/cpu-wan-small-warm.json"
# 3. a portable bundle loaded into an empty local cache, against no bundle
for run in save load none; do
  bundle=$work/bundle; [ "$run" = none ] && bundle=$work/bundle-none
  /usr/bin/time -f "$run %e s" env TORCHINDUCTOR_CACHE_DIR="$work/empty-$run" \
    ditkit run wan --preset small --compile-cache "$bundle" --out "$work/$run.mp4" --no-progress 2>&1 | grep -E "^(save|load|none) |compile cache" | tee -a "$out/cpu-bundle.txt"
done
# 4. Qwen-Image tiny, eager against regional
DITKIT_COMPILE_CACHE=$work/c3 bench qwen-image --compare eager,regional --steps 5 --json "$out/cpu-qwen-tiny.json"
