"""LoRA (core/lora.py) on the tiny Wan pipeline: files in the kohya/ComfyUI (dotted and flattened),
DiffSynth-Studio and PEFT layouts each give the output of a model whose weights were merged by hand;
several adapters, scale changes and unloads are exact (bf16 included); bad files are errors naming
their keys. The compiled path (graphs counted before and after, no recompile, same Parameter
objects) is the conformance kit's ``lora`` check, run on every built-in model by its conformance
class; the diffusers/PEFT files saved by diffusers are in tests/wan and tests/qwen_image."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import core
from core.errors import InputError, WeightsError
from core.lora import parse_lora_arg

LAYERS = ["blocks.0.self_attn.q", "blocks.0.cross_attn.o", "blocks.1.ffn.0", "time_projection.1", "head.head"]
R, ALPHA = 4, 8.0  # alpha / rank = 2: a dropped alpha/rank changes every result


@pytest.fixture(scope="module")
def pipe():
    return core.load("wan")


@pytest.fixture(autouse=True)
def _no_adapter_left(request):
    """A failing test leaves no adapter on the shared pipeline for the next one."""
    yield
    if "pipe" in request.fixturenames:
        request.getfixturevalue("pipe").unload_lora()


def _pairs(dit, layers=LAYERS, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in layers:
        w = dit.get_submodule(name).weight
        out[name] = (torch.randn(w.shape[0], R, generator=g) * 0.05, torch.randn(R, w.shape[1], generator=g))
    return out


def _kohya(pairs, prefix="diffusion_model.", flat=False):
    sd = {}
    for name, (up, down) in pairs.items():
        key = prefix + (name.replace(".", "_") if flat else name)
        sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"] = up, down
        sd[f"{key}.alpha"] = torch.tensor(ALPHA)
    return sd


def _hand_merged(dit, pairs, scale, coef=ALPHA / R, deltas=()):
    """A copy of ``dit`` with W + scale·coef·B·A (float32, cast back) written by hand."""
    ref = copy.deepcopy(dit)
    with torch.no_grad():
        for name, (up, down) in pairs.items():
            w = ref.get_submodule(name).weight
            w.copy_((w.float() + (scale * coef) * (up.float() @ down.float())).to(w.dtype))
        for name, param, d in deltas:
            p = getattr(ref.get_submodule(name), param)
            p.copy_((p.float() + scale * d.float()).to(p.dtype))
    return ref


def _forward(dit, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 512, dit.config.text_dim, generator=g)
    with torch.no_grad():
        return dit(x, torch.tensor([700.0]), ctx)


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_kohya_file_through_core_load_equals_hand_merged_pipeline(tmp_path):
    """``core.load(lora=[(file, scale)])`` with a ComfyUI-style file (``diffusion_model.``,
    lora_down/lora_up/alpha, ``diff_b`` bias delta, ``diff`` weight delta, Wan's ``diff_m``
    modulation delta): the generated video equals the one of a pipeline merged by hand."""
    base = core.load("wan")
    pairs = _pairs(base.dit)
    g = torch.Generator().manual_seed(9)
    deltas = [("blocks.0.self_attn.q", "bias", torch.randn(256, generator=g)),
              ("blocks.1.norm3", "weight", torch.randn(256, generator=g)),
              ("blocks.0", "modulation", torch.randn(1, 6, 256, generator=g))]
    sd = _kohya(pairs)
    sd["diffusion_model.blocks.0.self_attn.q.diff_b"] = deltas[0][2]
    sd["diffusion_model.blocks.1.norm3.diff"] = deltas[1][2]
    sd["diffusion_model.blocks.0.diff_m"] = deltas[2][2]
    save_file(sd, str(tmp_path / "style.safetensors"))
    lora = core.load("wan", lora=[(tmp_path / "style.safetensors", 0.6)])
    report = lora._lora.adapters["style"].report
    assert report.components["dit"].modules == len(LAYERS) and report.components["dit"].deltas == 3
    base.dit = _hand_merged(base.dit, pairs, 0.6, deltas=deltas)
    assert _same_state(lora.dit, base.dit)
    call = dict(num_inference_steps=2, guidance_scale=1.0, seed=3, progress=False)
    assert torch.equal(lora("a fox", **call).tensor(), base("a fox", **call).tensor())


@pytest.mark.parametrize("layout", ["kohya-flattened", "diffsynth", "peft-bare"])
def test_layouts_equal_hand_merge(pipe, layout):
    """Flattened kohya names (``lora_unet_blocks_0_self_attn_q``), DiffSynth-Studio's
    ``lora_A.default``/``lora_B.default`` (no alpha: scale 1) and bare PEFT names."""
    pairs = _pairs(pipe.dit, seed=1)
    if layout == "kohya-flattened":
        sd, coef = _kohya(pairs, prefix="lora_unet_", flat=True), ALPHA / R
    else:
        tag = ".default" if layout == "diffsynth" else ""
        sd = {f"{n}.lora_{ab}{tag}.weight": t for n, (up, down) in pairs.items() for ab, t in (("A", down), ("B", up))}
        coef = 1.0
    ref = _hand_merged(pipe.dit, pairs, 0.8, coef=coef)
    report = pipe.load_lora(sd, 0.8, adapter_name=layout)
    try:
        assert report.components["dit"].modules == len(LAYERS)
        assert _same_state(pipe.dit, ref)
        assert torch.equal(_forward(pipe.dit), _forward(ref))
    finally:
        pipe.unload_lora()


def test_peft_saved_folder_equals_peft_forward(tmp_path):
    """PEFT's own ``save_pretrained`` on our DiT (``base_model.model.`` keys, ``adapter_config.json``
    with ``lora_alpha`` and an ``alpha_pattern``): our fused output equals PEFT's unfused forward."""
    peft = pytest.importorskip("peft")
    pipe = core.load("wan")
    dit = copy.deepcopy(pipe.dit)
    config = peft.LoraConfig(r=R, lora_alpha=16, alpha_pattern={"ffn.0": 2}, target_modules=["q", "o", "ffn.0"],
                             init_lora_weights=False)
    model = peft.get_peft_model(dit, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 16
    report = pipe.load_lora(tmp_path)
    assert report.components["dit"].alphas == [2.0, 16.0]
    ref = model(*_inputs(pipe.dit))
    got = pipe.dit(*_inputs(pipe.dit))
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    model.disable_adapter_layers()
    assert (model(*_inputs(pipe.dit)) - ref).abs().max() > 1e-2 * ref.abs().max()  # the adapter mattered


def _inputs(dit, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([700.0]), torch.randn(1, 512, dit.config.text_dim, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_adapters_scales_and_unload_are_exact(dtype):
    """Two adapters on overlapping layers: each state equals the hand merge of the adapters left, in
    load order; ``set_lora_scale`` recomputes without reloading; ``unload_lora()`` gives back the
    original weights bit for bit (in bf16 ``W + d − d`` would not)."""
    pipe = core.load("wan", dtype=dtype)
    original = copy.deepcopy(pipe.dit)
    a, b = _pairs(pipe.dit, seed=2), _pairs(pipe.dit, LAYERS[:2] + ["blocks.1.self_attn.k"], seed=3)
    pipe.load_lora(_kohya(a), 0.7, adapter_name="a")
    pipe.load_lora(_kohya(b), 1.3, adapter_name="b")

    def merged(sa, sb):
        ref = copy.deepcopy(original)
        with torch.no_grad():
            for name in set(a) | set(b):
                w, acc = ref.get_submodule(name).weight, None
                acc = w.float()
                for pairs, s in ((a, sa), (b, sb)):
                    if name in pairs and s:
                        acc = acc + (s * (ALPHA / R)) * (pairs[name][0].float() @ pairs[name][1].float())
                w.copy_(acc.to(w.dtype))
        return ref

    assert _same_state(pipe.dit, merged(0.7, 1.3))
    pipe.set_lora_scale("a", -0.4)
    assert _same_state(pipe.dit, merged(-0.4, 1.3))
    pipe.set_lora_scale("b", 0.0)
    assert _same_state(pipe.dit, merged(-0.4, 0.0))
    pipe.unload_lora("a")
    assert sorted(pipe._lora.adapters) == ["b"] and _same_state(pipe.dit, merged(0.0, 0.0))
    pipe.set_lora_scale("b", 2.0)
    pipe.unload_lora()
    assert _same_state(pipe.dit, original) and not pipe._lora.originals


def test_weights_change_in_place(pipe):
    """Same Parameter objects and storage after load, scale change and unload (what keeps a
    compiled graph valid; the kit's ``lora`` check asserts no recompile on top)."""
    before = {n: (id(p), p.data_ptr()) for n, p in pipe.dit.named_parameters()}
    pipe.load_lora(_kohya(_pairs(pipe.dit)), adapter_name="inplace")
    pipe.set_lora_scale("inplace", 0.3)
    assert {n: (id(p), p.data_ptr()) for n, p in pipe.dit.named_parameters()} == before
    pipe.unload_lora()
    assert {n: (id(p), p.data_ptr()) for n, p in pipe.dit.named_parameters()} == before


def test_keys_that_match_nothing_are_named(pipe, tmp_path):
    sd = _kohya(_pairs(pipe.dit, LAYERS[:2]))
    sd.update(_kohya({"blocks.7.self_attn.q": _pairs(pipe.dit, ["blocks.0.self_attn.q"])["blocks.0.self_attn.q"]}))
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    before = copy.deepcopy(pipe.dit)
    with pytest.raises(WeightsError, match=r"3 of 9 keys match no module.*blocks\.7\.self_attn\.q\.alpha") as err:
        pipe.load_lora(path)
    assert str(path) in str(err.value) and "strict=False" in str(err.value)
    assert _same_state(pipe.dit, before) and not pipe._lora.adapters
    with pytest.warns(UserWarning, match="3 keys matched nothing"):
        report = pipe.load_lora(path, strict=False)
    assert report.components["dit"].modules == 2 and len(report.skipped) == 3
    pipe.unload_lora()
    assert _same_state(pipe.dit, before)


@pytest.mark.parametrize("case,error", [
    ("unknown suffix", WeightsError), ("shape", WeightsError), ("half pair", WeightsError), ("dora", WeightsError),
    ("bias delta on a layer without bias", WeightsError), ("empty", WeightsError), ("nan scale", InputError),
])
def test_bad_files_and_arguments(pipe, case, error):
    up, down = _pairs(pipe.dit, ["blocks.0.self_attn.q"])["blocks.0.self_attn.q"]
    key = "diffusion_model.blocks.0.self_attn.q"
    sd, scale = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}, 1.0
    if case == "unknown suffix":
        sd[f"{key}.something"] = up
    elif case == "shape":
        sd[f"{key}.lora_up.weight"] = up[:-1]
    elif case == "half pair":
        del sd[f"{key}.lora_down.weight"]
    elif case == "dora":
        sd[f"{key}.dora_scale"] = torch.ones(1)
    elif case == "bias delta on a layer without bias":
        sd["diffusion_model.blocks.0.norm1.diff_b"] = torch.ones(256)
    elif case == "empty":
        sd = {}
    else:
        scale = float("nan")
    with pytest.raises(error):
        pipe.load_lora(sd, scale)
    assert not pipe._lora.adapters if getattr(pipe, "_lora", None) else True


def test_adapter_names_and_models_without_lora(pipe, monkeypatch):
    pipe.load_lora(_kohya(_pairs(pipe.dit)), adapter_name="x")
    try:
        with pytest.raises(InputError, match="already loaded"):
            pipe.load_lora(_kohya(_pairs(pipe.dit)), adapter_name="x")
        with pytest.raises(InputError, match="no LoRA named 'y'"):
            pipe.set_lora_scale("y", 1.0)
        with pytest.raises(InputError, match="takes no LoRA"):
            pipe.load_lora(_kohya(_pairs(pipe.dit)), component="vae")
    finally:
        pipe.unload_lora()
    bare = core.load("mova")  # declares no LoRA key maps
    with pytest.raises(InputError, match="declares no LoRA"):
        bare.load_lora({"a.lora_A.weight": torch.zeros(1, 1), "a.lora_B.weight": torch.zeros(1, 1)})


def test_cli_lora_argument():
    assert parse_lora_arg("/loras/fast.safetensors") == ("/loras/fast.safetensors", 1.0, None)
    assert parse_lora_arg("fast.safetensors:0.8") == ("fast.safetensors", 0.8, None)
    assert parse_lora_arg("dit_low=/l/low.safetensors:1.5") == ("/l/low.safetensors", 1.5, "dit_low")
    assert parse_lora_arg("/odd:name.safetensors") == ("/odd:name.safetensors", 1.0, None)


def test_ditkit_run_lora_writes_what_the_python_api_writes(tmp_path, capsys):
    """``ditkit run --lora FILE:SCALE --shift 3`` (the Lightning call) prints the report and writes the
    image ``core.load(lora=...)`` gives; a missing file or a component the model lacks is one error line, exit status 2."""
    from core.cli import main

    pipe = core.load("qwen-image")
    g = torch.Generator().manual_seed(4)
    sd = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2"):
        w = pipe.transformer.get_submodule(name).weight
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, w.shape[1], generator=g)
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(w.shape[0], 2, generator=g)
    save_file(sd, str(tmp_path / "style.safetensors"))
    call = ["--steps", "2", "--height", "32", "--width", "32", "--seed", "2", "--prompt", "a red fox", "--shift", "3",
            "--guidance-scale", "1"]
    assert main(["run", "qwen-image", "--lora", f"{tmp_path / 'style.safetensors'}:0.5", *call,
                 "--out", str(tmp_path / "cli.png"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "LoRA 'style' (peft" in printed and "scale 0.5" in printed and "transformer: 2 of" in printed
    pipe.load_lora(tmp_path / "style.safetensors", 0.5)
    core.write_output(pipe("a red fox", num_inference_steps=2, height=32, width=32, seed=2, shift=3.0,
                           guidance_scale=1.0, progress=False),
                      tmp_path / "api.png")
    assert (tmp_path / "cli.png").read_bytes() == (tmp_path / "api.png").read_bytes()
    for bad in (f"{tmp_path / 'missing.safetensors'}", f"dit_low={tmp_path / 'style.safetensors'}"):
        assert main(["run", "qwen-image", "--lora", bad, *call, "--out", str(tmp_path / "x.png")]) == 2
        assert "ditkit: error: --lora" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
