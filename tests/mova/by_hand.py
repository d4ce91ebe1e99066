"""MOVA USP checks too slow for CI on two cores (minutes): run ``python -m tests.mova.by_hand``.

* 4 ranks: Ulysses 4, Ulysses 2 × ring 2, CFG parallel × Ulysses 2 (uneven audio and video);
* compile + USP (2 ranks, ring 2): equals eager + USP, no recompilation at a second size / CFG.

Prints each result and exits non-zero when one is off.
"""
from __future__ import annotations

import sys

from core.parallel import launch
from tests.mova import usp_workers


def main() -> int:
    bad = 0
    four = launch(usp_workers.degrees, 4, args=([(4, 1, False), (2, 2, False), (2, 1, True)],), timeout=900)
    for key, value in four.items():
        ok = all(value.get(k, True) for k in ("audio_dit.tokens", "dual_tower_bridge.audio")) if key.endswith("padded") \
            else max(value) <= 1e-5
        bad += not ok
        print(f"4 ranks  {key:<28} {value}  {'ok' if ok else 'FAIL'}")
    comp = launch(usp_workers.compiled, 2, args=((1, 2, False),), timeout=900)
    ok = max(comp["error"]) <= 1e-5 and comp["recompiled"] == "no"
    bad += not ok
    print(f"compile + USP (ring 2)  error {comp['error']}  recompiled {comp['recompiled']}  {'ok' if ok else 'FAIL'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
