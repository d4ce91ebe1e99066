#!/usr/bin/env bash
# Four `ditkit run wan` with one seed, at once, must write one file: `bash scripts/mp4_same_bytes.sh [N]`.
# Prints each file's SHA-256 and the number of distinct files (exit 1 unless it is 1).
set -euo pipefail
n=${1:-4}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for i in $(seq "$n"); do
  ditkit run wan --prompt "a red fox running through snow" --seed 0 --out "$work/fox$i.mp4" --no-progress >/dev/null &
done
wait
sha256sum "$work"/fox*.mp4
distinct=$(sha256sum "$work"/fox*.mp4 | cut -d' ' -f1 | sort -u | wc -l)
echo "$n runs, $distinct distinct file(s)"
[ "$distinct" -eq 1 ]
