"""The MOVA plugin module (entry point ``mova = "plugins.mova.plugin"`` in ``ditkit.plugins``): it only declares.

Two models, ``mova-360p`` (alias ``mova``) and ``mova-720p``: the same architecture and pipeline,
different official repositories and default sizes.  Presets: ``tiny`` (seeded random weights,
CPU seconds) and ``official`` (the repository folder ``OpenMOSS-Team/MOVA-360p`` / ``-720p``; each
component's ``config.json`` in it decides its shapes).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from core import hookimpl
from core.spec import (
    AttentionSite,
    Capabilities,
    Conformance,
    ModelSpec,
    Preset,
    SequenceSplit,
    SizeRange,
    UspAdapter,
    WeightFile,
    WeightsLayout,
)
from plugins.wan.diffusers_vae_keys import official_key as vae_official_key
from plugins.wan.diffusers_vae_keys import to_diffusers as vae_to_diffusers
from plugins.wan.dit import WAN_DIT_CONFIGS, WanDiTConfig
from plugins.wan.plugin import usp_adapter as wan_usp
from plugins.wan.plugin import save_sharded_safetensors
from plugins.wan.text_encoder import UMT5Config, official_to_transformers
from plugins.wan.vae import WAN21_VAE_CONFIG, WAN21_VAE_TINY_CONFIG, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

from .audio_dit import AUDIO_DIT_RELEASE, AudioDiTConfig
from .bridge import BRIDGE_RELEASE, BridgeConfig
from .dac import DAC_RELEASE, DACConfig
from .scheduler import RELEASED_SCHEDULER

if TYPE_CHECKING:  # the pipeline's code is imported when a model is built, not to declare it
    from .pipeline import MovaPipeline

__all__ = ["model_spec", "write_checkpoint", "umt5_key", "MODEL_FILE", "TEXT_ENCODER_FILE", "FOLDERS"]

MODEL_FILE = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_FILE = "text_encoder/model.safetensors"
FOLDERS = ("video_dit", "video_dit_2", "audio_dit", "dual_tower_bridge", "audio_vae", "video_vae",
           "text_encoder", "tokenizer", "scheduler")
"""The official repository's sub-folders (plus ``model_index.json`` at the top)."""

_HF_BLOCK = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}


def umt5_key(key: str) -> str | None:
    """transformers ``UMT5EncoderModel`` key (``text_encoder/``) → Wan :class:`UMT5Encoder` key.

    ``encoder.embed_tokens.weight`` is transformers' tied copy of ``shared.weight``: skipped when a
    file holds both. Unknown keys pass unchanged (the loader then names them as unexpected).
    """
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.embed_tokens.weight":
        return None
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
    if m and m.group(2) in _HF_BLOCK:
        return f"blocks.{m.group(1)}.{_HF_BLOCK[m.group(2)]}"
    return key


# -- configs -------------------------------------------------------------------------------------

def _config(tiny: bool) -> dict:
    if tiny:
        # 4 heads in each tower (head dims 32 and 16) so Ulysses 2 and 4 both run on CPU
        video = WanDiTConfig.tiny("i2v", dim=128, ffn_dim=256, num_heads=4, num_layers=3)
        return {"video_dit": asdict(video), "audio_dit": asdict(AudioDiTConfig.tiny()),
                "bridge": asdict(BridgeConfig.tiny()), "dac": asdict(DACConfig.tiny()),
                "vae": dict(WAN21_VAE_TINY_CONFIG), "t5": asdict(UMT5Config.tiny()),
                "scheduler": asdict(RELEASED_SCHEDULER)}
    return {"video_dit": asdict(WAN_DIT_CONFIGS["wan2.2-i2v-a14b"]), "audio_dit": asdict(AUDIO_DIT_RELEASE),
            "bridge": asdict(BRIDGE_RELEASE), "dac": asdict(DAC_RELEASE), "vae": dict(WAN21_VAE_CONFIG),
            "t5": asdict(UMT5Config.xxl()), "scheduler": asdict(RELEASED_SCHEDULER)}


def _layout(repo: str) -> WeightsLayout:
    files = [WeightFile(component=c, path=f"{c}/{MODEL_FILE}")
             for c in ("video_dit", "video_dit_2", "audio_dit", "dual_tower_bridge", "audio_vae")]
    files.append(WeightFile(component="video_vae", path=f"video_vae/{MODEL_FILE}",
                            key_map="plugins.wan.diffusers_vae_keys:official_key"))
    files.append(WeightFile(component="text_encoder", path=TEXT_ENCODER_FILE, key_map=umt5_key))
    return WeightsLayout(
        description=(f"the {repo} repository folder: video_dit/, video_dit_2/, audio_dit/, dual_tower_bridge/, "
                     f"audio_vae/, video_vae/ ({MODEL_FILE}, single or sharded + index, and config.json each), "
                     f"text_encoder/ (model.safetensors in transformers UMT5EncoderModel names), tokenizer/"),
        files=files,
        required_paths=["tokenizer"],
    )


# -- checkpoint writer ------------------------------------------------------------------------

def _save(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def write_checkpoint(pipe: MovaPipeline, root: str | Path, *, shards: int = 2) -> None:
    """Write ``pipe`` in the official repository layout under ``root`` (the spec's ``checkpoint_writer``):
    both video towers as sharded safetensors with the Hugging Face index, the other components as one
    file each, every folder's ``config.json``, the video VAE in diffusers names, umT5 in transformers
    names, the tokenizer, ``scheduler/scheduler_config.json`` (``pipe.scheduler``) and ``model_index.json``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    video_cfg = pipe.video_dit.config
    video_json = {"_class_name": "WanModel", "dim": video_cfg.dim, "in_dim": video_cfg.in_dim, "ffn_dim": video_cfg.ffn_dim,
                  "out_dim": video_cfg.out_dim, "text_dim": video_cfg.text_dim, "freq_dim": video_cfg.freq_dim,
                  "eps": video_cfg.eps, "patch_size": list(video_cfg.patch_size), "num_heads": video_cfg.num_heads,
                  "num_layers": video_cfg.num_layers, "has_image_input": False}
    for name in ("video_dit", "video_dit_2"):
        save_sharded_safetensors(getattr(pipe, name).state_dict(), root / name, shards)
        _write_json(root / name / "config.json", video_json)
    for name, cfg in (("audio_dit", pipe.audio_dit.config), ("dual_tower_bridge", pipe.dual_tower_bridge.config),
                      ("audio_vae", pipe.audio_vae.config)):
        _save(getattr(pipe, name).state_dict(), root / name / MODEL_FILE)
        _write_json(root / name / "config.json", cfg.to_json_dict())
    vae = pipe.video_vae
    _save(vae_to_diffusers(vae.state_dict()), root / "video_vae" / MODEL_FILE)
    dim = vae.encoder.conv1.weight.shape[0]
    _write_json(root / "video_vae" / "config.json", {
        "_class_name": "AutoencoderKLWan", "base_dim": dim, "z_dim": vae.z_dim,
        "dim_mult": list(pipe.vae_config["dim_mult"]), "num_res_blocks": pipe.vae_config["num_res_blocks"],
        "temperal_downsample": list(pipe.vae_config["temporal_downsample"]),
        "latents_mean": list(WAN21_LATENTS_MEAN), "latents_std": list(WAN21_LATENTS_STD)})
    t5 = pipe.text_encoder
    c = t5.config
    _save({official_to_transformers(k): v for k, v in t5.state_dict().items()}, root / TEXT_ENCODER_FILE)
    _write_json(root / "text_encoder" / "config.json", {
        "architectures": ["UMT5EncoderModel"], "model_type": "umt5", "vocab_size": c.vocab_size, "d_model": c.dim,
        "d_kv": c.dim_attn // c.num_heads, "d_ff": c.dim_ffn, "num_heads": c.num_heads, "num_layers": c.num_layers,
        "relative_attention_num_buckets": c.num_buckets, "relative_attention_max_distance": c.max_distance,
        "layer_norm_epsilon": c.eps, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False})
    pipe.prompt_encoder.tokenizer.save_pretrained(str(root / "tokenizer"))
    _write_json(root / "scheduler" / "scheduler_config.json", pipe.scheduler.to_json_dict())
    _write_json(root / "model_index.json", {
        "_class_name": "MOVA", "video_dit": ["mova", "WanModel"], "video_dit_2": ["mova", "WanModel"],
        "audio_dit": ["mova", "WanAudioModel"], "dual_tower_bridge": ["mova", "DualTowerConditionalBridge"],
        "audio_vae": ["mova", "DAC"], "video_vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
        "scheduler": ["mova", "FlowMatchPairScheduler"]})


# -- parallelism ---------------------------------------------------------------------------------

def _bridge_usp() -> UspAdapter:
    """The bridge runs inside both towers' passes: its tables follow the streams' token ranges and
    each direction gathers the other stream's keys/values (``gather_kv``); nothing to gather after."""
    return UspAdapter(
        component="dual_tower_bridge",
        heads="num_heads",  # gcd of the a2v and v2a head counts (40, 12 -> 4 released)
        splits=[SequenceSplit(sequence="video", module="video_rope", at="output", dim=1),
                SequenceSplit(sequence="audio", module="audio_rope", at="output", dim=1)],
        gathers=[],
        stays_split=["video", "audio"],
        sites={"a2v": AttentionSite(strategy="gather_kv", sequence="video", kv_sequence="audio"),
               "v2a": AttentionSite(strategy="gather_kv", sequence="audio", kv_sequence="video")},
    )


def _conformance() -> Conformance:
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    return Conformance(
        call={"num_inference_steps": 2, "num_frames": 5, "image": image},
        sizes={"height": SizeRange(min=16, max=48, multiple=16), "width": SizeRange(min=16, max=48, multiple=16)},
        # 9 frames at 24 fps: 19 audio tokens (remainder 1 on 2 ranks, 3 on 4) and 3·3·2 = 18 video
        # tokens at 48×32 (remainder 2 on 4 ranks)
        uneven_call={"num_frames": 9, "height": 48, "width": 32},
        bad_inputs=[{"num_frames": 6}, {"height": 40}, {"image": None}, {"image": "not an image"}, {"fps": 0}],
        # the official sampling loop and scheduler with DiffSynth-Studio's modules (test-time: .cache/mova-refs)
        reference="plugins.mova.reference:reference",
    )


_TINY_DEFAULTS = {"num_inference_steps": 2, "height": 32, "width": 32, "num_frames": 5, "fps": 24,
                  "guidance_scale": 5.0, "boundary": 0.9}
_MODELS = {
    "mova-360p": ("OpenMOSS-Team/MOVA-360p", ["mova"], 352, 640),
    "mova-720p": ("OpenMOSS-Team/MOVA-720p", [], 720, 1280),
}


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``mova-360p`` or ``mova-720p``."""
    repo, aliases, height, width = _MODELS[name]
    towers = ["video_dit", "video_dit_2", "audio_dit"]
    return ModelSpec(
        name=name,
        aliases=aliases,
        description=f"MOVA image+text to video with synchronised 48 kHz audio ({height}x{width} default)",
        pipeline="plugins.mova.pipeline:MovaPipeline",  # imported when a model is built
        presets={
            "tiny": Preset(description="tiny towers, bridge, VAEs and umT5; seeded random weights, CPU seconds",
                           config=_config(tiny=True), random_weights=True, defaults=_TINY_DEFAULTS),
            "official": Preset(description=f"the official repository folder {repo}; the official script's defaults",
                               config=_config(tiny=False),
                               defaults={"num_inference_steps": 50, "height": height, "width": width, "num_frames": 193,
                                         "fps": 24, "guidance_scale": 5.0, "boundary": 0.9}),
        },
        weights=_layout(repo),
        # The VAEs are left out (as for Wan: the causal chunk loop unrolls per latent frame count).
        compilable_models=towers + ["dual_tower_bridge"],
        repeated_blocks={"video_dit": ["WanAttentionBlock"], "video_dit_2": ["WanAttentionBlock"],
                         "audio_dit": ["WanAudioBlock"], "dual_tower_bridge": ["AudioToVideoBlock", "VideoToAudioBlock"]},
        usp=[wan_usp("video_dit", per_token_t=False), wan_usp("video_dit_2", per_token_t=False),
             wan_usp("audio_dit", per_token_t=False), _bridge_usp()],
        conformance=_conformance(),
        checkpoint_writer=write_checkpoint,
        capabilities=Capabilities(output="video+audio", cfg=True, compile=True, usp=True, negative_prompt=True,
                                  image_input=True, size_multiple=16, max_prompt_tokens=512),
    )


@hookimpl
def ditkit_register_models():
    return [model_spec(name) for name in _MODELS]
