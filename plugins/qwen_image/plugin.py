"""The Qwen-Image plugin module (entry point ``qwen-image = "plugins.qwen_image.plugin"`` in
``ditkit.plugins``): it only declares.

One model, ``qwen-image``, with a ``tiny`` preset (seeded random weights, CPU seconds) and an
``official`` preset for the ``Qwen/Qwen-Image`` repository folder (diffusers layout). The
pipeline is :class:`plugins.qwen_image.pipeline.QwenImagePipeline`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

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
from plugins.wan.diffusers_vae_keys import to_diffusers
from plugins.wan.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

from .dit import QwenImageDiTConfig
from .text_encoder import MAX_PROMPT_TOKENS, QWEN25VL_7B_CONFIG, full_model_state, tiny_text_encoder_config

if TYPE_CHECKING:  # the pipeline's code is imported when a model is built, not to declare it
    from .pipeline import QwenImagePipeline

TRANSFORMER_FILE = "transformer/diffusion_pytorch_model.safetensors"
TEXT_ENCODER_FILE = "text_encoder/model.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"

MODEL_INDEX = {
    "_class_name": "QwenImagePipeline",
    "_diffusers_version": "0.34.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "invert_sigmas": False, "max_image_seq_len": 8192, "max_shift": 0.9, "num_train_timesteps": 1000,
    "shift": 1.0, "shift_terminal": 0.02, "stochastic_sampling": False, "time_shift_type": "exponential",
    "use_beta_sigmas": False, "use_dynamic_shifting": True, "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
"""``scheduler/scheduler_config.json`` as published; the pipeline's schedule is
``core.sampler.dynamic_shift_sigmas`` with these numbers."""

VAE_CONFIG = {
    "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
    "temperal_downsample": [False, True, True], "dropout": 0.0,
    "latents_mean": list(WAN21_LATENTS_MEAN), "latents_std": list(WAN21_LATENTS_STD),
}
"""``vae/config.json`` (AutoencoderKLQwenImage) fields the pipeline reads."""


def _config(tiny: bool) -> dict:
    dit = QwenImageDiTConfig.tiny() if tiny else QwenImageDiTConfig()
    return {
        "transformer": dit.to_dict(),
        "text_encoder": tiny_text_encoder_config() if tiny else dict(QWEN25VL_7B_CONFIG),
        "vae": {**VAE_CONFIG, "base_dim": 8} if tiny else dict(VAE_CONFIG),
    }


LAYOUT = WeightsLayout(
    description=("the Qwen/Qwen-Image folder: model_index.json, transformer/ (config.json + sharded "
                 "diffusion_pytorch_model-*.safetensors + index), text_encoder/ (config.json + sharded "
                 "model-*.safetensors + index, Qwen2.5-VL older key layout), vae/ (config.json + "
                 "diffusion_pytorch_model.safetensors), tokenizer/, scheduler/scheduler_config.json"),
    files=[
        WeightFile(component="transformer", path=TRANSFORMER_FILE),
        WeightFile(component="text_encoder", path=TEXT_ENCODER_FILE,
                   key_map="plugins.qwen_image.text_encoder:text_model_key"),
        WeightFile(component="vae", path=VAE_FILE, key_map="plugins.wan.diffusers_vae_keys:official_key"),
    ],
    required_paths=["model_index.json", "tokenizer", "scheduler/scheduler_config.json", "transformer/config.json",
                    "text_encoder/config.json", "vae/config.json"],
)


def save_sharded(state_dict: dict, path: str | Path, shards: int = 2) -> None:
    """``<stem>-0000i-of-0000n.safetensors`` beside ``path`` plus the Hugging Face index
    ``<path>.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(state_dict)
    shards = max(1, min(shards, len(keys)))
    stem = path.name.removesuffix(".safetensors")
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state_dict[k].detach().contiguous().cpu() for k in keys[i::shards]}
        save_file(part, str(path.parent / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(v.numel() * v.element_size() for v in part.values())
    path.with_name(path.name + ".index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_checkpoint(pipe: QwenImagePipeline, root: str | Path, *, shards: int = 2) -> None:
    """Write ``pipe`` in the published ``Qwen/Qwen-Image`` layout under ``root`` (the spec's
    ``checkpoint_writer``; tests and the conformance kit): ``model_index.json``, the scheduler
    config, the transformer sharded with index, the text encoder as the whole
    ``Qwen2_5_VLForConditionalGeneration`` in the older key layout (a seeded random vision tower and
    ``lm_head`` at the config's shapes beside the real language model), the VAE in diffusers
    naming, every ``config.json``, and the tokenizer."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))

    save_sharded(pipe.transformer.state_dict(), root / TRANSFORMER_FILE, shards)
    dit_json = {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.34.0.dev0",
                **pipe.dit_config.to_dict(), "guidance_embeds": False}
    (root / "transformer" / "config.json").write_text(json.dumps(dit_json, indent=2))

    save_sharded(full_model_state(pipe.text_config, pipe.text_encoder), root / TEXT_ENCODER_FILE, shards)
    text_json = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                 **{k: v for k, v in pipe.text_json.items() if k not in ("architectures", "model_type")}}
    (root / "text_encoder" / "config.json").write_text(json.dumps(text_json, indent=2))

    from safetensors.torch import save_file

    (root / "vae").mkdir(exist_ok=True)
    vae_state = to_diffusers({k: v.detach().contiguous().cpu() for k, v in pipe.vae.state_dict().items()})
    save_file(vae_state, str(root / VAE_FILE), metadata={"format": "pt"})
    vae_json = {"_class_name": "AutoencoderKLQwenImage", "_diffusers_version": "0.34.0.dev0", **pipe.vae_config,
                "latents_mean": list(pipe.vae.latents_mean), "latents_std": list(pipe.vae.latents_std)}
    (root / "vae" / "config.json").write_text(json.dumps(vae_json, indent=2))

    pipe.prompt_encoder.tokenizer.save_pretrained(str(root / "tokenizer"))


USP = UspAdapter(
    component="transformer",
    heads="num_attention_heads",  # read from the DiT's config, so it fits tiny and official presets
    splits=[SequenceSplit(sequence="image", module="img_in", at="output", dim=1),
            SequenceSplit(sequence="image", module="pos_embed", at="output", arg=0, dim=1)],
    gathers=[SequenceGather(sequence="image", module="proj_out", at="output", dim=1)],
    sites={"joint": AttentionSite(strategy="joint", sequence="image", joint_text="replicate")},
)
"""Image tokens split after ``img_in``, the image rotary table by the same ranges, text (stream
and table) replicated on every rank, gathered after ``proj_out`` before unpacking."""


def model_spec() -> ModelSpec:
    """The :class:`ModelSpec` of Qwen-Image (text-to-image, 20 B DiT)."""
    tiny_defaults = {"num_inference_steps": 3, "height": 48, "width": 80, "guidance_scale": 4.0, "negative_prompt": " "}
    return ModelSpec(
        name="qwen-image",
        aliases=["qwen", "qwen-image-t2i"],
        description="Qwen-Image text-to-image: 20B double-stream DiT, Qwen2.5-VL-7B text encoder, Wan2.1 VAE",
        pipeline="plugins.qwen_image.pipeline:QwenImagePipeline",  # imported when a model is built
        presets={
            "tiny": Preset(description="tiny DiT/Qwen2.5-VL/VAE of the same classes, seeded random weights, CPU seconds",
                           config=_config(tiny=True), random_weights=True, defaults=tiny_defaults),
            "official": Preset(description="the Qwen/Qwen-Image folder, official generation defaults (1328x1328, true CFG 4.0)",
                               config=_config(tiny=False),
                               defaults={"num_inference_steps": 50, "height": 1328, "width": 1328,
                                         "guidance_scale": 4.0, "negative_prompt": " "}),
        },
        weights=LAYOUT,
        # The VAE is left out: eager decode of one frame is a small part of the run, and its causal
        # cache loop is not worth a graph per resolution.
        compilable_models=["transformer"],
        repeated_blocks={"transformer": ["QwenImageTransformerBlock"]},
        usp=[USP],
        # the DiT's module names are diffusers' (QwenImageTransformer2DModel): one naming for
        # diffusers/PEFT files (transformer. prefix), Qwen-Image-Lightning, kohya and DiffSynth-Studio
        lora=[LoraKeyMap(component="transformer", prefixes=["transformer."], namings={"diffusers": None})],
        checkpoint_writer=write_checkpoint,
        capabilities=Capabilities(output="image", cfg=True, compile=True, usp=True, negative_prompt=True,
                                  size_multiple=16, max_prompt_tokens=MAX_PROMPT_TOKENS),
        conformance=Conformance(
            call={"num_inference_steps": 2},
            sizes={"height": SizeRange(min=32, max=80, multiple=16), "width": SizeRange(min=32, max=80, multiple=16)},
            # 48x80 px: a 3x5 grid of 15 image tokens, remainder 1 on 2 ranks and 3 on 4 ranks; the
            # prompt and the negative prompt " " have different token counts
            uneven_call={"height": 48, "width": 80},
            bad_inputs=[{"aspect_ratio": "5:4"}, {"aspect_ratio": "1:1", "height": 64}],
            # diffusers' QwenImagePipeline loading what write_checkpoint writes (test-time: diffusers)
            reference="plugins.qwen_image.reference:diffusers_reference",
        ),
    )


@hookimpl
def ditkit_register_models():
    return [model_spec()]
