"""Where a load's peak resident memory goes: the earlier loader against the current one, per component.

For one component of an official-layout folder, in a fresh process each: the component is
allocated on the CPU in its final dtype without being touched (as ``core.load`` does), then filled

* ``earlier``: as ``core.weights.load_component`` did before the reader (safetensors'
  ``safe_open(...).get_tensor`` for every key of the component, or ``torch.load(mmap=True)`` for
  a ``.pth``, then ``load_state_dict``);
* ``current``: ``core.weights.load_component`` today (``os.preadv`` into the tensors).

A thread samples ``/proc/self/status`` every 10 ms: the peaks of ``RssAnon`` (anonymous memory:
the module, and any copy) and ``RssFile`` (file pages mapped into the process: memory-mapped
checkpoint pages count here while mapped), above the process's own before the fill.

    python scripts/load_rss_probe.py /path/to/Wan2.1-T2V-1.3B-random wan2.1-t2v-1.3b dit
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import torch
sys.path.insert(0, sys.argv[5])
import core
from core.weights import check_layout, component_module, load_component

root, name, component, how = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
preset = "official" if len(sys.argv) < 7 else sys.argv[6]
spec = core.get_registry().model(name).spec
wf = next(w for w in spec.weights.files if w.component == component)
with torch.device("meta"):
    pipe = spec.pipeline(dict(spec.presets[preset].config), device=torch.device("meta"), dtype=torch.bfloat16, weights=None)
module = component_module(pipe, component)
checked = check_layout(__import__("pathlib").Path(root), wf, module)
module.to_empty(device="cpu")  # allocated, untouched: what core.load builds
weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in module.state_dict(keep_vars=True).values()}.values())

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out

base = status()
peaks = dict(base)
done = threading.Event()
def sample():
    while not done.wait(0.01):
        for k, v in status().items():
            peaks[k] = max(peaks[k], v)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
if how == "current":
    load_component(__import__("pathlib").Path(root), wf, module, checked=checked)
else:
    ckpt, mapping = checked
    if wf.format == "torch":
        sd = torch.load(str(ckpt.files[0]), map_location="cpu", mmap=True, weights_only=True)
        tensors = {ck: sd[ck] for ck in mapping.values()}
    else:
        tensors = ckpt.tensors(list(mapping.values()))  # safe_open(...).get_tensor, every key
    with torch.no_grad():
        module.load_state_dict({mk: tensors[ck] for mk, ck in mapping.items()}, strict=True)
seconds = time.perf_counter() - start
time.sleep(0.05)
done.set()
print("RESULT" + json.dumps({"how": how, "seconds": round(seconds, 2), "weights": weights,
      **{f"peak_{k}_increase": peaks[k] - base[k] for k in base}}))
"""


def main() -> None:
    root, name, component = sys.argv[1:4]
    repo = str(Path(__file__).resolve().parents[1])
    gb = 1e9
    for how in ("earlier", "current"):
        res = subprocess.run([sys.executable, "-c", CHILD, root, name, component, how, repo], capture_output=True,
                             text=True, check=True)
        r = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")][-1][6:])
        w = r["weights"]
        print(f"{how:8} {component}: {r['seconds']:6.2f} s; peak above start: RSS {r['peak_VmRSS_increase'] / gb:.2f} GB "
              f"= {r['peak_VmRSS_increase'] / w:.2f}x the weights ({w / gb:.2f} GB), of which anonymous "
              f"{r['peak_RssAnon_increase'] / gb:.2f} GB, mapped file pages {r['peak_RssFile_increase'] / gb:.2f} GB",
              flush=True)


if __name__ == "__main__":
    main()
