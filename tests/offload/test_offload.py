"""Offload (core.offload): every mode equals the resident output bit for bit, the compute copies exist
only while their unit runs, disk keeps the blocks in the mapped files, auto and the "does not fit"
error name the mode that fits, compile holds one graph per block class while blocks move."""
from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import core
from core import offload as offloading
from core.errors import CompileError, InputError
from core.loading import load_spec
from core.weights import write_checkpoint

from ..conftest import ROOT, subprocess_env

PROMPT = "a lighthouse on a cliff at dusk"
IMAGE = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
# one step with CFG: the denoiser runs twice, so block offload learns its order and prefetches
CALLS = {
    "wan": dict(num_inference_steps=1),
    "qwen-image": dict(num_inference_steps=1),
    "mova": dict(num_inference_steps=2, image=IMAGE),  # 2 steps: both video experts
    "example-dit": dict(num_inference_steps=2, height=40, width=56),
}


@pytest.fixture(scope="module")
def specs(example_site):
    sys.path.insert(0, str(example_site))
    try:
        from core.testing import Subject

        example = Subject("example-dit", plugin="ditkit_example.plugin").spec
    finally:
        sys.path.remove(str(example_site))
        sys.path.append(str(example_site))  # keep it importable for the pipelines, behind everything else
    registry = core.get_registry()
    return {"example-dit": example, **{n: registry.model(n).spec for n in ("wan", "qwen-image", "mova")}}


class Runs:
    """Per model: the resident pipeline and output, a checkpoint of its weights, and one pipeline per mode."""

    def __init__(self, specs, tmp):
        self.specs, self.tmp, self.cache = specs, tmp, {}

    def checkpoint(self, name):
        key = (name, "ckpt")
        if key not in self.cache:
            pipe, _ = self.resident(name)
            root = self.tmp / name
            spec = self.specs[name]
            if spec.checkpoint_writer is not None:
                spec.checkpoint_writer(pipe, root)
            else:
                write_checkpoint(pipe, root, spec.weights)
            self.cache[key] = root
        return self.cache[key]

    def resident(self, name):
        if (name, None) not in self.cache:
            pipe = load_spec(self.specs[name], "tiny", device="cpu", dtype=torch.float32)
            self.cache[(name, None)] = pipe, self.generate(pipe, name)
        return self.cache[(name, None)]

    def offloaded(self, name, mode, **options):
        key = (name, mode, tuple(sorted(options.items())))
        if key not in self.cache:
            weights = self.checkpoint(name) if mode == "disk" else None
            pipe = load_spec(self.specs[name], "tiny", weights=weights, device="cpu", dtype=torch.float32,
                             offload=mode, **options)
            self.cache[key] = pipe, self.generate(pipe, name)
        return self.cache[key]

    @staticmethod
    def generate(pipe, name):
        return pipe(PROMPT, seed=1, progress=False, **CALLS[name]).tensor()


@pytest.fixture(scope="module")
def runs(specs, tmp_path_factory):
    return Runs(specs, tmp_path_factory.mktemp("offload"))


# -- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CALLS))
def test_every_mode_equals_the_resident_output_bit_for_bit(runs, name):
    _, reference = runs.resident(name)
    for mode in offloading.MODES:
        pipe, out = runs.offloaded(name, mode)
        assert pipe.offload.mode == mode and pipe.offload.units, mode
        assert torch.equal(out, reference), f"{name} offload={mode}: max |diff| {(out - reference).abs().max():.3g}"
        assert pipe.offload.materialised() == [], f"{name} {mode}: compute copies left after the generation"


def test_uneven_groups_of_blocks_equal_resident_and_hold_one_group_at_a_time(runs):
    pipe, out = runs.offloaded("example-dit", "block", num_blocks_per_group=3)
    off = pipe.offload
    sizes = [len(u.modules) for u in off.units]
    assert sizes == [3, 1], sizes  # 2 joint + 2 single blocks in groups of 3: remainder 1
    assert torch.equal(out, runs.resident("example-dit")[1])
    # no prefetch for block on a CPU: the peak is exactly the largest group
    assert off.peak_bytes_on_device == max(u.nbytes for u in off.units) > 0


# -- where the weights are ---------------------------------------------------------------------


def _watch_blocks(pipe):
    """During each unit's call: which units are materialised, and weak references to the compute
    copies (dead once released); per parameter, whether it used its home's memory."""
    off = pipe.offload
    seen, copies = [], []

    def probe(unit):
        def hook(module, args):
            seen.append((unit.name, off.materialised(),
                         all(p.data_ptr() != h.data_ptr() for p, h in zip(unit.params, unit.homes))))
            copies.extend(weakref.ref(t) for t in unit.copies)
        return hook

    handles = [u.modules[0].register_forward_pre_hook(probe(u)) for u in off.units]
    return seen, copies, handles


@pytest.mark.parametrize("mode", ["block", "disk"])
def test_a_block_has_a_compute_copy_only_while_it_runs(runs, mode):
    pipe, _ = runs.offloaded("wan", mode)
    off = pipe.offload
    seen, copies, handles = _watch_blocks(pipe)
    try:
        runs.generate(pipe, "wan")
    finally:
        for h in handles:
            h.remove()
    names = {u.name for u in off.units}
    assert {n.split(":")[0] for n in names} == {"text_encoder", "dit"}  # umT5's blocks too (_repeated_blocks)
    assert {s[0] for s in seen} == names
    for name, materialised, own_copy in seen:
        assert own_copy, f"{name} ran on its storage copy"
        assert name in materialised
        # block: nothing else; disk on a CPU prefetches the next group (a thread), so at most one more
        assert len(materialised) <= (1 if mode == "block" else 2), (name, materialised)
    assert copies and all(ref() is None for ref in copies), "a compute copy outlived its block"
    for unit in off.units:  # between calls the parameters are their storage copies, nothing of their own
        assert all(p.data_ptr() == h.data_ptr() for p, h in zip(unit.params, unit.homes)), unit.name


def _mapped_ranges(root: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(str(root)):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_disk_blocks_live_in_the_mapped_checkpoint_files(runs):
    pipe, _ = runs.offloaded("wan", "disk")
    ranges = _mapped_ranges(runs.checkpoint("wan"))
    assert ranges
    params = [p for u in pipe.offload.units for p in u.params]
    assert params
    for p in params:
        assert any(a <= p.data_ptr() < b for a, b in ranges), "a block parameter is not in the mapped checkpoint"
    # the resident parameters have memory of their own
    resident = [p for p in pipe.dit.patch_embedding.parameters()]
    assert resident and not any(a <= p.data_ptr() < b for p in resident for a, b in ranges)


def test_model_mode_holds_one_component_at_a_time_and_nested_calls_together(runs, specs):
    spec = core.get_registry().model("wan2.2-t2v-a14b").spec  # two experts: high noise, then low noise
    pipe = load_spec(spec, "tiny", device="cpu", dtype=torch.float32, offload="model")
    off = pipe.offload
    seen = []
    for name in ("text_encoder", "dit", "dit_low"):
        getattr(pipe, name).register_forward_pre_hook(lambda m, a, n=name: seen.append((n, off.materialised())))
    pipe.vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(("vae", off.materialised())))
    pipe(PROMPT, seed=0, progress=False, num_inference_steps=3)
    assert {n for n, _ in seen} == {"text_encoder", "dit", "dit_low", "vae"}
    for name, materialised in seen:
        assert materialised == [name], (name, materialised)
    assert off.materialised() == []
    # MOVA: the bridge and the video tower run inside the audio tower's call: all three on the device
    mova, _ = runs.offloaded("mova", "model")
    seen.clear()
    mova.dual_tower_bridge.register_forward_pre_hook(lambda m, a: seen.append(("bridge", mova.offload.materialised())))
    runs.generate(mova, "mova")
    assert seen and all(set(m) == {"audio_dit", "dual_tower_bridge", m[0]} and m[0].startswith("video_dit")
                        for _, m in seen), seen


# -- compile -----------------------------------------------------------------------------------


# Block and model offload of an inductor-compiled pipeline (no recompilation, one graph per block class,
# a compiled method routed through its component's unit): tests/test_compile.py, on its compiled pipeline.


def test_compiling_after_model_offload_keeps_the_compiled_method_inside_its_unit(runs):
    """The usual order, load(offload=...) then compile_pipeline(): the compiled ``vae.decode`` is
    bound after the offload wrapped it, and must be wrapped again (its submodules' hooks are inside
    the compiled region and never run). The eager backend: dynamo only."""
    pipe = load_spec(runs.specs["example-dit"], "tiny", device="cpu", dtype=torch.float32, offload="model")
    pipe.compile_pipeline(backend="eager", compile_models=["vae"])
    vae = next(u for u in pipe.offload.units if u.component == "vae")
    assert torch.equal(runs.generate(pipe, "example-dit"), runs.resident("example-dit")[1])
    assert vae.loads == 1


# -- estimates, auto, errors -------------------------------------------------------------------


def _free(monkeypatch, device_bytes, host_bytes=None):
    from core import guards

    def available(device):
        return device_bytes if torch.device(device).type != "cpu" or host_bytes is None else host_bytes

    monkeypatch.setattr(guards, "available_bytes", available)


GPU_FOOTPRINT = offloading.Footprint(total=6010, components={"text_encoder": 1000, "dit": 2400, "dit_low": 2400,
                                                             "vae": 200}, buffers=10, blocks=4600, group=115)
"""The ladder on a GPU, for a model shaped like a real one (MiB): two experts, an encoder, a VAE."""


def test_auto_takes_the_least_offload_that_fits(runs, monkeypatch):
    # a real footprint: the blocks are part of the weights, a group part of the blocks
    fp = offloading.footprint(runs.resident("wan")[0])
    assert fp.total > fp.blocks > fp.group > 0 and set(fp.components) == {"text_encoder", "dit", "vae"}
    fp = GPU_FOOTPRINT
    cuda = torch.device("cuda")
    need = {m: offloading.needed_bytes(fp, m, cuda) for m in (None, *offloading.MODES)}
    assert need == {None: (6010, 0), "model": (2410, 6000), "block": (1640, 4600), "disk": (1640, 0)}
    for free, expected in ((6010, None), (6009, "model"), (2410, "model"), (2409, "block")):
        _free(monkeypatch, free, host_bytes=6000)
        assert offloading.choose_mode(fp, cuda) == expected, free
    _free(monkeypatch, 2409, host_bytes=4599)  # host memory cannot hold the blocks' pinned copies
    assert offloading.choose_mode(fp, cuda) == "disk"
    _free(monkeypatch, 1639, host_bytes=10**6)
    with pytest.raises(InputError, match="does not fit"):
        offloading.choose_mode(fp, cuda)
    # on a CPU the storage and compute copies share the memory: only disk needs less than none
    assert offloading.needed_bytes(fp, "block", "cpu")[0] > fp.total
    _free(monkeypatch, 6009)
    assert offloading.choose_mode(fp, torch.device("cpu")) == "disk"
    with pytest.raises(InputError, match="weights="):
        offloading.choose_mode(fp, torch.device("cpu"), disk_possible=False)


def test_the_does_not_fit_hint_names_the_least_offload_that_would_fit(monkeypatch):
    """On a CPU only disk needs less than no offload, so the errors tested here on a CPU can only
    name disk; on a GPU model and block need less too, and the hint names the least that fits."""
    cuda = torch.device("cuda")
    for free, current, least in ((2410, None, "model"), (2409, None, "block"), (2409, "model", "block"),
                                 (1640, "block", "disk")):
        _free(monkeypatch, free, host_bytes=6000)
        hint = offloading.fit_hint(GPU_FOOTPRINT, current, cuda, 0, loaded=False)
        assert hint.startswith(f"offload={least!r}"), (free, current, hint)


def test_auto_through_load_picks_disk_when_only_disk_fits(tmp_path, monkeypatch):
    from .big_plugin import spec

    small = load_spec(spec, "small")  # 16 blocks of 256x256: the blocks are nearly all of it
    write_checkpoint(small, tmp_path, spec.weights)
    fp = offloading.footprint(small)
    _free(monkeypatch, 10**15)
    assert load_spec(spec, "small", weights=tmp_path, offload="auto").offload is None
    _free(monkeypatch, offloading.needed_bytes(fp, "disk", "cpu")[0] + 64 * 1024)  # the activations are smaller
    chosen = load_spec(spec, "small", weights=tmp_path, offload="auto")
    assert chosen.offload is not None and chosen.offload.mode == "disk"
    with pytest.raises(InputError, match="does not fit"):
        load_spec(spec, "small", offload="auto")  # no checkpoint: nothing but disk would fit


def test_does_not_fit_error_names_the_offload_mode_that_would(tmp_path, monkeypatch):
    from core.loading import check_call

    from .big_plugin import spec

    pipe = load_spec(spec, "small")  # loaded, no offload: its weights are already out of the free memory
    args = pipe.resolve(prompt=PROMPT, seed=0)
    activations = pipe.estimate_bytes(args)
    _free(monkeypatch, activations - 1)
    with pytest.raises(InputError, match=r"offload='disk' with weights=.* would fit"):
        pipe.check_inputs(args)
    fp = offloading.footprint(pipe)
    _free(monkeypatch, activations + offloading.needed_bytes(fp, "disk", "cpu")[0] - fp.total - 1)
    with pytest.raises(InputError, match="smaller size"):  # not even disk: the general advice
        pipe.check_inputs(args)
    # before loading (ditkit run's preflight), the weights count as the mode places them
    wan = core.get_registry().model("wan").spec
    meta_fp = offloading.footprint(load_spec(wan, "tiny"))
    _free(monkeypatch, meta_fp.total - 1)
    with pytest.raises(InputError, match=r"offload=None needs .*offload='disk' would fit with weights="):
        check_call("wan", prompt=PROMPT, seed=0, height=16, width=16, num_frames=1)
    with pytest.raises(InputError, match=r"offload='block' needs"):
        check_call("wan", prompt=PROMPT, seed=0, height=16, width=16, num_frames=1, offload="block")


def test_bad_requests_are_one_clear_error(runs, specs):
    with pytest.raises(InputError, match="offload='sideways'"):
        load_spec(specs["wan"], "tiny", offload="sideways")
    with pytest.raises(InputError, match="needs weights="):
        load_spec(specs["wan"], "tiny", offload="disk")
    with pytest.raises(InputError, match="num_blocks_per_group"):
        load_spec(specs["wan"], "tiny", offload="block", num_blocks_per_group=0)
    pipe, _ = runs.offloaded("wan", "block")
    with pytest.raises(InputError, match="offloaded"):
        pipe.to("cpu")
    with pytest.raises(CompileError, match="CUDA graphs"):
        pipe.compile_pipeline(mode="reduce-overhead")


# -- with the checkpoint reader, fp8 storage and sharded weights -------------------------------


def test_block_and_disk_equal_resident_loaded_from_the_same_files(runs, specs):
    """One fp32 checkpoint (safetensors and .pth) loaded in bfloat16 three ways: resident (the
    reader fills the deferred parameters, casting each tensor once), block (the same reader on the
    host, then the filled parameters become the blocks' homes) and disk (the files mapped, cast
    per call). Every path casts, and the outputs are equal bit for bit."""
    root = runs.checkpoint("wan")
    pipes, outs = {}, {}
    for mode in (None, "block", "disk"):
        pipes[mode] = load_spec(specs["wan"], "tiny", weights=root, device="cpu", dtype=torch.bfloat16, offload=mode)
        outs[mode] = runs.generate(pipes[mode], "wan")
    resident, block, disk = pipes[None], pipes["block"], pipes["disk"]
    assert resident.load_stats.cast > 0 and block.load_stats.cast == resident.load_stats.cast
    homes = [(h.dtype, d) for u in disk.offload.units for h, d in zip(u.homes, u.dtypes)]
    assert homes and set(homes) == {(torch.float32, torch.bfloat16)}  # the file's dtype, cast per call
    assert torch.equal(outs["block"], outs[None]) and torch.equal(outs["disk"], outs[None]), \
        {m: (o.float() - outs[None].float()).abs().max().item() for m, o in outs.items()}


def test_fp8_storage_moves_fp8_under_every_mode_and_equals_fp8_resident(runs, specs):
    """weight_dtype='float8_e4m3fn' with offload: the stored fp8 parameters are what the units move
    (half of bf16's bytes per transfer) and disk casts the mapped file to fp8 per call; each mode
    equals fp8 resident loaded from the same checkpoint, bit for bit."""
    from torch import nn

    from core.fp8_weights import Fp8Linear

    spec, root = specs["example-dit"], runs.checkpoint("example-dit")

    def load(mode):
        return load_spec(spec, "tiny", weights=root, device="cpu", dtype=torch.float32, offload=mode,
                         weight_dtype="float8_e4m3fn")

    reference = runs.generate(load(None), "example-dit")
    for mode in offloading.MODES:
        pipe = load(mode)
        moved = {id(p): (h.dtype, d) for u in pipe.offload.units for p, h, d in zip(u.params, u.homes, u.dtypes)}
        layers = [m for u in pipe.offload.units for root_module in u.modules for m in root_module.modules()
                  if isinstance(m, nn.Linear)]
        assert layers and all(type(m) is Fp8Linear for m in layers), mode
        file_dtype = torch.float32 if mode == "disk" else torch.float8_e4m3fn
        assert {moved.get(id(m._parameters["weight"])) for m in layers} == {(file_dtype, torch.float8_e4m3fn)}, mode
        assert torch.equal(runs.generate(pipe, "example-dit"), reference), mode


@pytest.mark.parametrize("mode", ["model", "disk", "auto"])
def test_sharded_weights_compose_with_block_offload_only(runs, specs, mode):
    """shard_weights=True with offload='block': tests/test_usp_pipeline.py (2 ranks, bit-equal to
    USP). The other modes are refused before anything is built, naming both options."""
    weights = runs.checkpoint("example-dit") if mode == "disk" else None
    with pytest.raises(InputError, match=rf"offload='{mode}' and shard_weights=True cannot be combined: .*"
                                         rf"use offload='block' with shard_weights=True"):
        load_spec(specs["example-dit"], "tiny", weights=weights, device="cpu", use_usp=True, shard_weights=True,
                  offload=mode)


# -- LoRA -------------------------------------------------------------------------------------

LORA_LAYERS = ["blocks.0.self_attn.q", "blocks.1.ffn.0", "head.head"]  # inside two blocks and outside them


def _kohya_lora(dit, rank=4, alpha=8.0):
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name in LORA_LAYERS:
        w = dit.get_submodule(name).weight
        sd[f"diffusion_model.{name}.lora_up.weight"] = 0.05 * torch.randn(w.shape[0], rank, generator=g)
        sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g)
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    return sd


def _file_hashes(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_lora_under_every_mode_equals_lora_resident_and_unloads_exactly(runs):
    """load_lora on an offloaded pipeline fuses into each parameter's home (the host copy; under
    disk the copy-on-write mapping, never the file): the output equals the resident pipeline with
    the same LoRA, bit for bit, and unload_lora() gives the plain output back."""
    resident, plain = runs.resident("wan")
    lora = _kohya_lora(resident.dit)
    resident.load_lora(lora, 0.7, adapter_name="style")
    try:
        with_lora = runs.generate(resident, "wan")
    finally:
        resident.unload_lora()
    assert not torch.equal(with_lora, plain)
    files = _file_hashes(runs.checkpoint("wan"))
    for mode in offloading.MODES:
        pipe, out = runs.offloaded("wan", mode)
        if mode == "model":
            # a component called outside a generation keeps its compute copy until another one is
            # called: the LoRA must still reach the home the DiT reloads from in the next generation
            embed = pipe.dit.patch_embedding
            with torch.no_grad():
                embed(torch.zeros(1, embed.in_channels, *embed.kernel_size))
            assert pipe.offload.materialised() == ["dit"]
        pipe.load_lora(lora, 0.7, adapter_name="style")
        try:
            got = runs.generate(pipe, "wan")
        finally:
            pipe.unload_lora()
        assert torch.equal(got, with_lora), (mode, (got - with_lora).abs().max().item())
        assert torch.equal(runs.generate(pipe, "wan"), plain), mode
    assert _file_hashes(runs.checkpoint("wan")) == files  # the mapped checkpoint was never written


def test_lora_patches_fp8_stored_weights_and_unloads_them_exactly(specs, runs):
    """Under weight_dtype fp8 the stored (registered) fp8 parameter is what a LoRA patches: cast of
    W0 + scale·(alpha/rank)·B·A in float32, and unload restores the stored bytes."""
    pipe = load_spec(specs["wan"], "tiny", device="cpu", dtype=torch.float32, weight_dtype="float8_e4m3fn")
    lora = _kohya_lora(pipe.dit)
    name = LORA_LAYERS[0]
    stored = pipe.dit.get_submodule(name)._parameters["weight"]
    before = stored.detach().clone()
    pipe.load_lora(lora, 0.5)
    up, down = lora[f"diffusion_model.{name}.lora_up.weight"], lora[f"diffusion_model.{name}.lora_down.weight"]
    want = (before.float() + (0.5 * 8.0 / 4) * (up @ down)).to(torch.float8_e4m3fn)
    assert torch.equal(stored.view(torch.uint8), want.view(torch.uint8))
    assert not torch.equal(stored.view(torch.uint8), before.view(torch.uint8))
    pipe.unload_lora()
    assert torch.equal(stored.view(torch.uint8), before.view(torch.uint8))


# -- the CLI -----------------------------------------------------------------------------------


def test_ditkit_run_offload(example, tmp_path, capsys):
    from core.cli import main

    out = tmp_path / "fox.png"
    assert main(["run", "example", "--offload", "block", "--steps", "1", "--no-progress", "--out", str(out)]) == 0
    assert out.is_file()
    # what the pipeline holds (the 4 example blocks, one unit each), not the word in tmp_path's name
    assert "Offload(mode='block', device=cpu, units=4," in capsys.readouterr().out
    assert main(["run", "example", "--offload", "disk", "--steps", "1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ditkit: error:") and "weights=" in err[0]


# -- host memory under disk offload (a 1 GiB model, measured in a fresh process) --------------


@pytest.fixture(scope="module")
def stack_checkpoint(tmp_path_factory):
    """The 1 GiB test plugin's checkpoint, written by this process (the measured one only reads it).
    One random block matrix, repeated: the values do not matter to memory, only to finiteness."""
    from safetensors.torch import save_file

    from .big_plugin import DIM, spec

    root = tmp_path_factory.mktemp("stack")
    with torch.device("meta"):  # shapes only
        small = load_spec(spec, "tiny", device="meta")
    fc = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(0)) / DIM**0.5
    state = {k: (fc.clone() if k.endswith("fc.weight") else torch.randn(v.shape) * 0.1)
             for k, v in small.dit.state_dict().items()}
    (root / "dit").mkdir()
    save_file(state, str(root / "dit" / "model.safetensors"))
    return root


@pytest.mark.slow
def test_disk_offload_holds_a_fraction_of_the_weights_in_host_memory(stack_checkpoint):
    """Peak anonymous memory (``RssAnon``) above the process's own start, over loading and one
    generation, is at most 35% of the weights; mapped file pages (``RssFile``: the page cache of
    the checkpoint, clean and reclaimable) are reported, not bounded. The measure sees the compute
    copies: the peak holds at least one block's."""
    res = subprocess.run([sys.executable, "-m", "tests.offload.rss_worker", str(stack_checkpoint)],
                         capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    disk = json.loads(res.stdout)
    weights = disk["weights_bytes"]
    assert weights >= 10**9 and disk["units"] == 16
    assert disk["block_bytes"] <= disk["anon_bytes"] <= 0.35 * weights, disk


def test_the_gpu_script_runs_its_step_and_memory_parts_at_tiny_size_on_a_cpu(tmp_path):
    """scripts/offload_gpu.py (CUDA figures for docs/PERFORMANCE.md) at tiny size on the CPU: its
    parity part is this file's first test, its compile part tests/test_compile.py's offload test."""
    import runpy

    script = runpy.run_path(str(ROOT / "scripts" / "offload_gpu.py"))
    out = tmp_path / "offload.json"
    assert script["main"](["--device", "cpu", "--tiny", "--only", "step,memory", "--steps", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["step"]["modes"]) == {"resident", "block", "disk"}
    rows = {(r["model"], r["mode"]): r for r in report["memory"]}
    assert set(rows) == {(m, mode) for m in ("wan2.1-t2v-14b", "mova-360p") for mode in ("model", "block", "none")}
    assert not [r for r in rows.values() if "error" in r], rows
