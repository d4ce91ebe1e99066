"""LoRA and Lightning on Qwen-Image: a LoRA saved by diffusers' ``QwenImagePipeline.save_lora_weights``
equals diffusers' own PEFT forward; the Qwen-Image-Lightning file layout (``lora_down``/``lora_up``/
``alpha``, bare or ``diffusion_model.``) equals the publisher's own merge; ``shift=3`` is the
published Lightning scheduler config run through diffusers' ``FlowMatchEulerDiscreteScheduler``.

Tolerance of the forward parity: 1e-5 of the output's scale (float32, tests/qwen_image/test_qwen_dit.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import core
from plugins.qwen_image.dit import QwenImageDiTConfig, QwenImageTransformer, pack_latents, unpack_latents

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

LIGHTNING_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256, "base_shift": math.log(3), "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": math.log(3), "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
"""ModelTC/Qwen-Image-Lightning, generate_with_diffusers.py ("We use shift=3 in distillation")."""


@pytest.fixture(scope="module")
def pipe():
    return core.load("qwen-image")


def _pair():
    cfg = QwenImageDiTConfig.tiny()
    ref = diffusers.QwenImageTransformer2DModel(
        patch_size=cfg.patch_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
        axes_dims_rope=cfg.axes_dims_rope).eval()
    ours = QwenImageTransformer(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return cfg, ours, ref


def test_diffusers_saved_lora_equals_diffusers_forward(tmp_path, pipe):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cfg, ours, ref = _pair()
    config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "add_v_proj", "to_add_out", "img_mod.1",
                                                            "net.2", "proj_out"], init_lora_weights=False)
    ref.add_adapter(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    diffusers.QwenImagePipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                                  transformer_lora_adapter_metadata=config.to_dict())
    saved = pipe.transformer
    pipe.transformer = ours
    try:
        report = pipe.load_lora(tmp_path)
        h, w = 6, 8
        latents = torch.randn(1, 16, h, w, generator=g)
        text = torch.randn(1, 5, cfg.joint_attention_dim, generator=g)
        sigma = torch.tensor([0.7])
        with torch.no_grad():
            got = ours(latents, sigma, text)
    finally:
        pipe.unload_lora()
        pipe.transformer = saved
    assert report.components["transformer"].alphas == [2.0] and report.formats == ["peft"]

    def theirs():
        out = ref(hidden_states=pack_latents(latents), encoder_hidden_states=text,
                  encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long), timestep=sigma,
                  img_shapes=[(1, h // 2, w // 2)], return_dict=False)[0]
        return unpack_latents(out, h, w)

    with torch.no_grad():
        want = theirs()
        ref.disable_adapters()
        base = theirs()
    assert (want - base).abs().max() > 0.05 * base.abs().max()  # the adapter really changes the output
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _publisher_merge(model, lora):
    """ModelTC/Qwen-Image-Lightning's ``load_and_merge_lora_weight`` (generate_with_diffusers.py),
    restated: for each parameter ``k.weight`` with ``[diffusion_model.]k.lora_down.weight`` in the file,
    ``W = (W + alpha/rank · up @ down).type_as(W)`` in float32."""
    native = any("diffusion_model." in k for k in lora)
    base = "diffusion_model." if native else ""
    with torch.no_grad():
        for key, value in model.named_parameters():
            down = base + key.replace(".weight", ".lora_down.weight")
            if down in lora:
                up = lora[base + key.replace(".weight", ".lora_up.weight")].float()
                alpha = float(lora[base + key.replace(".weight", ".alpha")])
                d = lora[down].float()
                value.copy_((value.float() + (alpha / d.shape[0]) * (up @ d)).type_as(value))


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_lightning_layout_equals_publisher_merge(pipe, prefix):
    """The layout of Qwen-Image-Lightning's files (per layer ``lora_down``/``lora_up``/``alpha``, the
    ComfyUI copies under ``diffusion_model.``), every linear layer of every block, rank 8, alpha 4."""
    import copy

    model = pipe.transformer
    g = torch.Generator().manual_seed(3)
    lora = {}
    for name, layer in model.named_modules():
        if name.startswith("transformer_blocks.") and isinstance(layer, torch.nn.Linear):
            lora[f"{prefix}{name}.lora_down.weight"] = torch.randn(8, layer.in_features, generator=g) / 30
            lora[f"{prefix}{name}.lora_up.weight"] = torch.randn(layer.out_features, 8, generator=g) / 30
            lora[f"{prefix}{name}.alpha"] = torch.tensor(4.0)  # alpha / rank = 0.5
    want = copy.deepcopy(model)
    _publisher_merge(want, lora)
    report = pipe.load_lora(lora, adapter_name="lightning")
    try:
        assert report.components["transformer"].modules == len(lora) // 3 == 2 * 14  # 14 linear layers a block
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
    finally:
        pipe.unload_lora()


@pytest.mark.parametrize("steps", [8, 4])
@pytest.mark.parametrize("h,w", [(1328, 1328), (928, 1664), (512, 512)])
def test_lightning_schedule_is_the_published_scheduler_config(pipe, steps, h, w):
    """``shift=3`` equals diffusers' FlowMatchEulerDiscreteScheduler built from Lightning's published
    config, driven as diffusers' QwenImagePipeline drives it (σ = linspace(1, 1/N, N), μ from the
    token count: the same ln 3 at every size), to one float32 rounding (diffusers shifts in float32,
    ditkit in float64 and rounds once: ≤ 2⁻²⁴ apart); the official grid differs."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    cfg = LIGHTNING_SCHEDULER_CONFIG
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
    mu = calculate_shift((h // 16) * (w // 16), cfg["base_image_seq_len"], cfg["max_image_seq_len"],
                         cfg["base_shift"], cfg["max_shift"])
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    got = pipe.sigmas(steps, h, w, shift=3.0)
    assert got.shape == (steps + 1,) and (got - sched.sigmas.float()).abs().max() <= 2 ** -24
    assert got[-2].item() == pytest.approx(3 / steps / (1 + 2 / steps))  # no terminal stretch
    assert not torch.allclose(pipe.sigmas(steps, h, w), got)


def test_lightning_call_pattern_runs_cond_only(pipe):
    """8 steps, guidance 1 (the negative prompt is never encoded), shift 3: the traced σ are the
    schedule above."""
    encoded = []
    original = pipe.encode_prompt
    pipe.encode_prompt = lambda text: encoded.append(text) or original(text)
    try:
        with pipe.tracing() as trace:
            pipe("a lighthouse", num_inference_steps=8, guidance_scale=1.0, shift=3.0, seed=0, progress=False)
    finally:
        del pipe.encode_prompt
    assert encoded == ["a lighthouse"]
    assert torch.equal(trace["sigmas"], pipe.sigmas(8, 48, 80, shift=3.0))
    with pytest.raises(core.InputError, match="shift"):
        pipe("a lighthouse", shift=0.0, progress=False)
