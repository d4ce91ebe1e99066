"""The Wan plugin module (entry point ``wan = "plugins.wan.plugin"`` in ``ditkit.plugins``): it only declares.

Five models, each with a ``tiny`` preset (seeded random weights, CPU seconds) and an ``official``
preset that loads the official checkpoint layout (docs/models.md, Wan checkpoint layout) with the official generation
defaults.  The pipeline is :class:`plugins.wan.pipeline.WanPipeline` for all of them.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from core import hookimpl
from core.spec import (
    AttentionSite,
    Capabilities,
    Conformance,
    LoraKeyMap,
    ModelSpec,
    Preset,
    SequenceGather,
    SequenceSplit,
    SizeRange,
    UspAdapter,
    WeightFile,
    WeightsLayout,
)

from .dit import WAN_DIT_CONFIGS, WanDiTConfig
from .text_encoder import T5_CHECKPOINT, TOKENIZER_SUBDIR, UMT5Config
from .vae import WAN21_VAE_CONFIG, WAN21_VAE_TINY_CONFIG
from .vae22 import WAN22_VAE_CONFIG, WAN22_VAE_TINY_CONFIG

DIT_FILE = "diffusion_pytorch_model.safetensors"
"""Single file, or sharded with ``diffusion_pytorch_model.safetensors.index.json`` beside it."""

_THIRD_PARTY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def dit_key(key: str) -> str:
    """Checkpoint key → ``WanModel`` key: official names pass; repack prefixes (ComfyUI) are stripped."""
    for prefix in _THIRD_PARTY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _config(name: str, *, tiny: bool) -> dict:
    """A preset ``config`` for :class:`WanPipeline`: task, DiT, VAE and umT5 configurations."""
    dit = WAN_DIT_CONFIGS[name]
    task = dit.model_type
    vae_version = "2.2" if task == "ti2v" else "2.1"
    if tiny:
        dit = WanDiTConfig.tiny(task)
        t5 = asdict(UMT5Config.tiny())
        vae = WAN22_VAE_TINY_CONFIG if vae_version == "2.2" else WAN21_VAE_TINY_CONFIG
    else:
        t5 = asdict(UMT5Config.xxl())
        vae = WAN22_VAE_CONFIG if vae_version == "2.2" else WAN21_VAE_CONFIG
    return {
        "task": task,
        "two_experts": name.endswith("-a14b"),
        "dit": asdict(dit),
        "vae": {"version": vae_version, **vae},
        "t5": t5,
    }


def _layout(name: str, two_experts: bool, vae_file: str) -> WeightsLayout:
    if two_experts:
        dits = [WeightFile(component="dit", path=f"high_noise_model/{DIT_FILE}", key_map=dit_key),
                WeightFile(component="dit_low", path=f"low_noise_model/{DIT_FILE}", key_map=dit_key)]
        where = f"high_noise_model/ and low_noise_model/ each with {DIT_FILE} (single or sharded + index)"
    else:
        dits = [WeightFile(component="dit", path=DIT_FILE, key_map=dit_key)]
        where = f"{DIT_FILE} (single or sharded + index)"
    return WeightsLayout(
        description=f"the {name} repository: {where}, {vae_file}, {T5_CHECKPOINT}, {TOKENIZER_SUBDIR}/",
        files=[
            *dits,
            WeightFile(component="vae", path=vae_file, format="torch"),
            WeightFile(component="text_encoder", path=T5_CHECKPOINT, format="torch"),
        ],
        required_paths=[TOKENIZER_SUBDIR],
    )


def save_sharded_safetensors(state_dict: dict, folder: str | Path, shards: int = 2) -> None:
    """``diffusion_pytorch_model-0000i-of-0000n.safetensors`` plus the Hugging Face index
    ``diffusion_pytorch_model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state_dict)
    shards = max(1, min(shards, len(keys)))
    stem = DIT_FILE.removesuffix(".safetensors")
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state_dict[k].detach().contiguous().cpu() for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(v.numel() * v.element_size() for v in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{DIT_FILE}.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(pipe, root: str | Path, *, shards: int = 2, t5_dtype: torch.dtype | None = None) -> None:
    """Write a :class:`WanPipeline`'s weights in the official layout under ``root`` (the spec's
    ``checkpoint_writer``; tests and the conformance kit): sharded DiT safetensors with index (in
    ``high_noise_model/`` and ``low_noise_model/`` for two experts), the VAE and umT5 ``.pth``
    state dicts (umT5 cast to ``t5_dtype`` if given; the published file is bf16) and the
    tokenizer folder ``google/umt5-xxl``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if pipe.two_experts:
        save_sharded_safetensors(pipe.dit.state_dict(), root / "high_noise_model", shards)
        save_sharded_safetensors(pipe.dit_low.state_dict(), root / "low_noise_model", shards)
    else:
        save_sharded_safetensors(pipe.dit.state_dict(), root, shards)
    vae_file = "Wan2.2_VAE.pth" if pipe.vae.z_dim == 48 else "Wan2.1_VAE.pth"
    torch.save({k: v.detach().cpu() for k, v in pipe.vae.state_dict().items()}, root / vae_file)
    t5 = {k: v.detach().cpu() for k, v in pipe.text_encoder.state_dict().items()}
    if t5_dtype is not None:
        t5 = {k: v.to(t5_dtype) for k, v in t5.items()}
    torch.save(t5, root / T5_CHECKPOINT)
    pipe.prompt_encoder.tokenizer.save_pretrained(root / TOKENIZER_SUBDIR)


def _conformance(task: str) -> Conformance:
    multiple = 32 if task == "ti2v" else 16
    call = {"num_inference_steps": 2, "num_frames": 5}
    if task == "i2v":
        # a fixed image; the pipeline resizes it to each drawn size
        call["image"] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    bad = [{"num_frames": 6}, {"height": multiple + 8}]
    if task == "i2v":
        bad.append({"image": None})
    else:
        bad.append({"image": "not an image"})
    return Conformance(
        call=call,
        sizes={"height": SizeRange(min=multiple, max=3 * multiple, multiple=multiple),
               "width": SizeRange(min=multiple, max=3 * multiple, multiple=multiple),
               "num_frames": SizeRange(min=5, max=9, multiple=4, offset=1)},
        # 9 frames → 3 latent frames, a 3×1 token grid: 9 tokens, remainder 1 on 2 and on 4 ranks
        uneven_call={"num_frames": 9, "height": 3 * multiple, "width": multiple},
        bad_inputs=bad,
        reference="plugins.wan.reference:reference",  # diffusers' own Wan pipelines (test-time dependency)
    )


def lora_key_maps(dits: list[str]) -> list[LoraKeyMap]:
    """LoRA files for the DiT(s): official names (kohya/ComfyUI, lightx2v: ``diffusion_model.`` prefix,
    ``diff``/``diff_b``/``diff_m`` deltas) or diffusers names (``transformer.`` prefix; diffusers' Wan2.2
    pipeline saves the low-noise expert's as ``transformer_2.``)."""
    namings = {"official": None, "diffusers": "plugins.wan.diffusers_dit_keys:official_module"}
    prefixes = {"dit": ["transformer."], "dit_low": ["transformer_2."]}
    return [LoraKeyMap(component=d, prefixes=prefixes[d], namings=namings, delta_suffixes={"diff_m": "modulation"})
            for d in dits]


def usp_adapter(component: str, per_token_t: bool) -> UspAdapter:
    """Split points of ``plugins/wan/dit.py``: tokens after the patch embedding, the RoPE table with
    them, per-token timestep features (TI2V-5B), gathered at the head before unpatchify."""
    splits = [SequenceSplit(module="patch_embedding", at="output", dim=1),
              SequenceSplit(module="rope", at="output", dim=1)]
    if per_token_t:
        splits.append(SequenceSplit(module="time_features", at="output", dim=1))
    return UspAdapter(
        component=component,
        heads="num_heads",  # read from WanModel.config, so it fits tiny and real presets
        splits=splits,
        gathers=[SequenceGather(module="head", at="output", dim=1)],
        sites={"self": AttentionSite(strategy="parallel"), "cross": AttentionSite(strategy="local")},
    )


# name: (Hugging Face repository, aliases, description, tiny defaults, default-preset defaults)
_TINY_T2V = {"num_inference_steps": 3, "height": 32, "width": 32, "num_frames": 5, "guidance_scale": 5.0, "shift": 5.0, "fps": 16}
_MODELS = {
    "wan2.1-t2v-1.3b": (
        "Wan-AI/Wan2.1-T2V-1.3B", ["wan", "wan2.1", "wan2.1-1.3b"], "Wan2.1 text-to-video, 1.3B DiT",
        _TINY_T2V,
        {"num_inference_steps": 50, "height": 480, "width": 832, "num_frames": 81, "guidance_scale": 5.0, "shift": 5.0, "fps": 16},
    ),
    "wan2.1-t2v-14b": (
        "Wan-AI/Wan2.1-T2V-14B", ["wan2.1-14b"], "Wan2.1 text-to-video, 14B DiT",
        _TINY_T2V,
        {"num_inference_steps": 50, "height": 480, "width": 832, "num_frames": 81, "guidance_scale": 5.0, "shift": 5.0, "fps": 16},
    ),
    "wan2.2-t2v-a14b": (
        "Wan-AI/Wan2.2-T2V-A14B", ["wan2.2", "wan2.2-a14b"], "Wan2.2 text-to-video, two 14B experts (high noise, then low noise)",
        {**_TINY_T2V, "guidance_scale": 4.0, "guidance_scale_low": 3.0, "shift": 12.0, "boundary": 0.875},
        {"num_inference_steps": 40, "height": 480, "width": 832, "num_frames": 81, "guidance_scale": 4.0,
         "guidance_scale_low": 3.0, "shift": 12.0, "boundary": 0.875, "fps": 16},
    ),
    "wan2.2-i2v-a14b": (
        "Wan-AI/Wan2.2-I2V-A14B", ["wan2.2-i2v"], "Wan2.2 image-to-video, two 14B experts, image through the VAE (no CLIP)",
        {**_TINY_T2V, "guidance_scale": 3.5, "guidance_scale_low": 3.5, "boundary": 0.9},
        {"num_inference_steps": 40, "height": 480, "width": 832, "num_frames": 81, "guidance_scale": 3.5,
         "guidance_scale_low": 3.5, "shift": 5.0, "boundary": 0.9, "fps": 16},
    ),
    "wan2.2-ti2v-5b": (
        "Wan-AI/Wan2.2-TI2V-5B", ["wan2.2-5b", "wan2.2-ti2v"], "Wan2.2 text(+image)-to-video, 5B DiT, Wan2.2 VAE (16x16 stride)",
        {**_TINY_T2V, "height": 64, "width": 64, "fps": 24},
        {"num_inference_steps": 50, "height": 704, "width": 1280, "num_frames": 121, "guidance_scale": 5.0, "shift": 5.0, "fps": 24},
    ),
}


def _small(tiny_config: dict) -> dict:
    return {**tiny_config, "dit": {**tiny_config["dit"], "dim": 512, "ffn_dim": 2048, "num_heads": 4, "num_layers": 4}}


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of one released Wan model."""
    repo, aliases, description, tiny_defaults, defaults = _MODELS[name]
    tiny_config, real_config = _config(name, tiny=True), _config(name, tiny=False)
    two_experts, task = real_config["two_experts"], real_config["task"]
    vae_file = "Wan2.2_VAE.pth" if task == "ti2v" else "Wan2.1_VAE.pth"
    dits = ["dit", "dit_low"] if two_experts else ["dit"]
    return ModelSpec(
        name=name,
        aliases=aliases,
        description=description,
        pipeline="plugins.wan.pipeline:WanPipeline",  # imported when a model is built
        presets={
            "tiny": Preset(description="tiny DiT/VAE/umT5, seeded random weights, CPU seconds",
                           config=tiny_config, random_weights=True, defaults=tiny_defaults),
            "small": Preset(description="a 4-layer DiT of width 512 (4 heads of 128) over the tiny VAE and umT5, "
                                        "seeded random weights: CPU benchmarks (ditkit bench)",
                            config=_small(tiny_config), random_weights=True,
                            # 160×240, 9 frames: 3 latent frames of 10×15 tokens (450 tokens)
                            defaults={**tiny_defaults, "height": 160 * (2 if task == "ti2v" else 1),
                                      "width": 240 * (2 if task == "ti2v" else 1), "num_frames": 9}),
            "official": Preset(description=f"the official checkpoint {repo}, official generation defaults",
                              config=real_config, defaults=defaults),
        },
        weights=_layout(repo, two_experts, vae_file),
        # The VAE is left out: its causal chunk loop unrolls into one graph per latent frame count
        # (README.md, "Acceleration declarations").
        compilable_models=dits,
        repeated_blocks={d: ["WanAttentionBlock"] for d in dits},
        usp=[usp_adapter(d, per_token_t=task == "ti2v") for d in dits],
        lora=lora_key_maps(dits),
        conformance=_conformance(task),
        checkpoint_writer=write_checkpoint,
        capabilities=Capabilities(
            output="video", cfg=True, compile=True, usp=True, negative_prompt=True,
            image_input=task != "t2v", size_multiple=32 if task == "ti2v" else 16, max_prompt_tokens=512,
        ),
    )


@hookimpl
def ditkit_register_models():
    return [model_spec(name) for name in _MODELS]
