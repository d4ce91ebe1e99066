"""LoRA on Wan: files written by PEFT and diffusers' own save function, loaded into the official-
naming DiT, equal diffusers' own LoRA forward; the diffusers → official module map covers every
layer diffusers' WanTransformer3DModel has; the two experts of Wan2.2 take their own files; the
step-distill call pattern is lightx2v's published schedule.

Reference: diffusers 0.42 ``WanTransformer3DModel`` with a PEFT ``LoraConfig`` adapter (PEFT's own
``base(x) + B(A(x))·alpha/r`` forward, not fused), weights copied from ours through the key table
of ``tests/wan/test_dit.py`` (checked there against diffusers with ``strict=True``). Tolerance:
1e-5 of the output's scale, as that file's parity tests (same float32 math, other op order).
"""
from __future__ import annotations

import pytest
import torch

import core
from core.errors import InputError
from plugins.wan.diffusers_dit_keys import official_module
from plugins.wan.dit import WanDiTConfig
from plugins.wan.pipeline import expert_steps
from tests.wan.test_dit import assert_parity, inputs, make_pair

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_out", "time_proj", "linear_1", "linear_2"]


def _peft_lora(theirs, r: int = 4, alpha: int = 8, seed: int = 5):
    """A PEFT adapter on diffusers' model with non-zero B (PEFT initialises B to 0)."""
    from peft import LoraConfig

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    theirs.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return config


def test_diffusers_saved_lora_equals_diffusers_forward(tmp_path):
    from peft.utils import get_peft_model_state_dict

    cfg = WanDiTConfig.tiny("t2v")
    ours, theirs = make_pair(cfg)
    config = _peft_lora(theirs)
    diffusers.WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(theirs),
                                            transformer_lora_adapter_metadata=config.to_dict())
    pipe = core.load("wan")
    pipe.dit = ours
    report = pipe.load_lora(tmp_path / "pytorch_lora_weights.safetensors", scale=1.0)
    part = report.components["dit"]
    assert report.formats == ["peft"] and part.naming == "diffusers"
    assert part.alphas == [8.0] and part.ranks == [4]
    # per block attn1/attn2 q, k, v, o and 2 FFN layers; text and time embedders 2 each, time_proj, proj_out
    assert part.modules == 2 * 8 + 2 * 2 + 4 + 1 + 1 and part.layers == 27  # the 27th: the patch-embedding conv
    x, t, context = inputs(cfg)
    with torch.no_grad():
        got = ours(x, t, context)
        ref = theirs(x, t, context, return_dict=False)[0]
        theirs.disable_adapters()
        base = theirs(x, t, context, return_dict=False)[0]
    assert (ref - base).abs().max() > 0.05 * base.abs().max()  # the adapter really changes the output
    assert_parity(got, ref)


def test_official_module_names_every_diffusers_layer():
    """Every module with a matrix or kernel weight in diffusers' model (I2V's image projections
    aside: no CLIP branch here) maps to an official module of ours with the same weight shape."""
    cfg = WanDiTConfig.tiny("t2v")
    ours, theirs = make_pair(cfg)
    mine = dict(ours.named_modules())
    layers = [(n, m) for n, m in theirs.named_modules() if getattr(m, "weight", None) is not None and m.weight.dim() >= 2]
    assert len(layers) == 27
    for name, module in layers:
        target = official_module(name)
        assert target in mine, name
        assert mine[target].weight.shape == module.weight.shape, name
    assert official_module("blocks.0.attn2.add_k_proj") is None  # the I2V CLIP branch ditkit does not have


def _kohya(module, names, r=2, seed=0, prefix="diffusion_model."):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        w = module.get_submodule(name).weight
        sd[f"{prefix}{name}.lora_down.weight"] = torch.randn(r, w.shape[1], generator=g)
        sd[f"{prefix}{name}.lora_up.weight"] = torch.randn(w.shape[0], r, generator=g)
        sd[f"{prefix}{name}.alpha"] = torch.tensor(float(r))
    return sd


@pytest.fixture(scope="module")
def two_experts():
    return core.load("wan2.2-t2v-a14b")


def test_two_experts_take_their_own_files(two_experts):
    """diffusers names the low-noise expert ``transformer_2.``; official-naming files (lightx2v's high
    and low noise LoRAs) need ``component=``, and without it the error says so."""
    pipe = two_experts
    high = _kohya(pipe.dit, ["blocks.0.self_attn.q"], seed=1)
    low = _kohya(pipe.dit_low, ["blocks.0.self_attn.q"], seed=2)
    with pytest.raises(InputError, match="component="):
        pipe.load_lora(high)
    before = {n: pipe.dit_low.blocks[0].self_attn.q.weight.clone() for n in ("low",)}
    pipe.load_lora(high, component="dit", adapter_name="high")
    assert torch.equal(pipe.dit_low.blocks[0].self_attn.q.weight, before["low"])
    pipe.load_lora(low, component="dit_low", adapter_name="low")
    assert not torch.equal(pipe.dit_low.blocks[0].self_attn.q.weight, before["low"])
    pipe.unload_lora()
    assert torch.equal(pipe.dit_low.blocks[0].self_attn.q.weight, before["low"])
    diffusers_style = {k.replace("diffusion_model.blocks.0.self_attn.q", "transformer_2.blocks.0.attn1.to_q"): v
                       for k, v in low.items()}
    report = pipe.load_lora(diffusers_style)
    assert list(report.components) == ["dit_low"] and report.components["dit_low"].naming == "diffusers"
    pipe.unload_lora()
    assert torch.equal(pipe.dit_low.blocks[0].self_attn.q.weight, before["low"])


def _lightx2v_sigmas(steps_list, shift):
    """lightx2v's ``WanStepDistillScheduler.set_denoising_timesteps`` (ModelTC/LightX2V,
    lightx2v/models/schedulers/wan/step_distill/scheduler.py), restated: a 1000-point shifted grid
    read at ``1000 − t`` for each listed timestep."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas[[1000 - t for t in steps_list]]


def test_step_distill_call_pattern_is_lightx2v_schedule():
    """``num_inference_steps=4, shift=5`` gives lightx2v's σ for denoising_step_list [1000, 750, 500,
    250] bit for bit (their Euler step x0 + σ_next·v is ``core.sampler.euler_step``), and Wan2.2's
    boundary puts the expert switch at their ``boundary_step_index`` 2."""
    from core.sampler import shifted_sigmas

    ours = shifted_sigmas(4, 5.0)
    assert torch.equal(ours[:-1], _lightx2v_sigmas([1000, 750, 500, 250], 5.0)) and ours[-1] == 0
    assert ours.tolist()[:4] == [1.0, 0.9375, pytest.approx(0.833333, abs=1e-6), 0.625]
    assert expert_steps(4, 5.0, 0.875) == ["dit", "dit", "dit_low", "dit_low"]  # T2V-A14B
    assert expert_steps(4, 5.0, 0.9) == ["dit", "dit", "dit_low", "dit_low"]  # I2V-A14B


def test_step_distill_call_runs_cond_only_on_four_steps(two_experts):
    pipe = two_experts
    calls = []
    hooks = [getattr(pipe, name).register_forward_pre_hook(lambda m, a, n=name: calls.append(n))
             for name in ("dit", "dit_low")]
    try:
        with pipe.tracing() as trace:
            pipe("a fox", num_inference_steps=4, guidance_scale=1.0, shift=5.0, seed=0, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert calls == ["dit", "dit", "dit_low", "dit_low"]  # one branch per step: CFG 1 skips the negative prompt
    assert torch.equal(trace["sigmas"], torch.tensor([1.0, 0.9375, 0.8333333134651184, 0.625, 0.0]))
