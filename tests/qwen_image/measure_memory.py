"""Peak host memory of loading an official-layout Qwen-Image folder (a measurement, not a test).

Writes a checkpoint in the published layout with the plugin's writer, then loads it through
``core.load("qwen-image", weights=...)`` in a fresh subprocess and reports the peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) before and after the load, against the
checkpoint's size on disk. The folder's ``config.json`` files set the shapes, so a "medium"
checkpoint (the real DiT and text-encoder widths with one block each) loads through the tiny
preset. From the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python tests/qwen_image/measure_memory.py tiny
    OMP_NUM_THREADS=1 .venv/bin/python tests/qwen_image/measure_memory.py medium
    OMP_NUM_THREADS=1 .venv/bin/python tests/qwen_image/measure_memory.py medium streamed

(``streamed``: the same load with a tensor-by-tensor copy in place of ``core.weights.load_component``.)

Numbers are in plugins/qwen_image/README.md.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import resource, sys, torch, core
from plugins.qwen_image import pipeline  # imports (transformers, tokenizers) before the baseline
if sys.argv[2] == "streamed":
    # experiment: copy tensor by tensor into the built module instead of core.weights.load_component
    # reading a whole component's tensors first
    import core.loading
    from safetensors import safe_open
    from core.weights import check_layout

    def load_streamed(root, wf, module, checked=None):
        ckpt, mapping = checked or check_layout(root, wf, module)
        params = module.state_dict(keep_vars=True)
        by_file = {}
        for mk, ck in mapping.items():
            by_file.setdefault(ckpt._where[ck], []).append((mk, ck))
        with torch.no_grad():
            for path, pairs in by_file.items():
                with safe_open(str(path), framework="pt") as f:
                    for mk, ck in pairs:
                        params[mk].copy_(f.get_tensor(ck))
        return True

    core.loading.load_component = load_streamed
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pipe = core.load("qwen-image", preset="tiny", weights=sys.argv[1], device="cpu", dtype=torch.bfloat16)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
params = sum(p.numel() * p.element_size() for m in pipe.components().values() for p in m.parameters())
print(before, after, params)
"""


def _medium_config() -> dict:
    from plugins.qwen_image.dit import QwenImageDiTConfig
    from plugins.qwen_image.plugin import model_spec

    config = copy.deepcopy(model_spec().presets["official"].config)
    config["transformer"] = QwenImageDiTConfig(num_layers=1).to_dict()
    te = config["text_encoder"]
    te.update(num_hidden_layers=1, max_window_layers=1, vocab_size=32000)
    te["vision_config"] = {**te["vision_config"], "depth": 1, "fullatt_block_indexes": [0]}
    config["vae"] = {**config["vae"], "base_dim": 32}
    return config


def write(which: str, root: str) -> None:
    import torch

    import core
    from plugins.qwen_image.pipeline import QwenImagePipeline
    from plugins.qwen_image.plugin import write_checkpoint

    if which == "tiny":
        pipe = core.load("qwen-image", device="cpu", dtype=torch.bfloat16)
    else:
        pipe = QwenImagePipeline(_medium_config(), dtype=torch.bfloat16)
    write_checkpoint(pipe, root, shards=int(os.environ.get("SHARDS", "2")))


def main(which: str, loader: str = "core") -> None:
    # Linux keeps ru_maxrss across fork + exec, so both children start from this small process
    # (which never imports torch): the writer's peak cannot leak into the loader's numbers.
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, __file__, "--write", which, tmp], check=True)
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", CHILD, tmp, loader], capture_output=True, text=True, check=True)
        before, after, params = map(int, out.stdout.split()[-3:])
    mib = 1024 ** 2
    print(json.dumps({
        "checkpoint_safetensors_MiB": round(size / mib, 1),
        "loaded_parameters_MiB": round(params / mib, 1),
        "rss_before_load_MiB": round(before * 1024 / mib, 1),
        "rss_peak_after_load_MiB": round(after * 1024 / mib, 1),
        "peak_increase_MiB": round((after - before) * 1024 / mib, 1),
        "peak_increase_over_loaded_parameters": round((after - before) * 1024 / params, 2),
    }, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        write(sys.argv[2], sys.argv[3])
    else:
        main(*(sys.argv[1:] or ["tiny"]))
