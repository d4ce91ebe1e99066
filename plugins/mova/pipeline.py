"""MOVA pipeline: image + prompt → video frames and a synchronised 48 kHz waveform.

Components (attribute names = the official repository's folder names): ``text_encoder`` (umT5,
Wan's :class:`UMT5Encoder`), ``video_dit`` (high-noise video tower), ``video_dit_2`` (low-noise),
``audio_dit``, ``dual_tower_bridge``, ``video_vae`` (Wan2.1 VAE), ``audio_vae`` (continuous DAC).

Generation (the official script's defaults: 50 steps, CFG 5.0 on both outputs, boundary 0.9,
193 frames at 24 fps, seed 42 upstream; the shift, 5.0, is the scheduler config's):

* video latent ``(1, 16, (F−1)/4+1, H/8, W/8)``; audio samples ``N_a = ⌊48000·F/fps⌋``, audio
  latent ``(1, 128, ⌊(N_a−1)/960⌋+1)``; ``F ≡ 1 (mod 4)`` and ``H, W`` multiples of 16, checked
  before any work;
* the image is fitted (cover-resize, centre crop) to (H, W); ``[image, zeros × (F−1)]`` →
  video VAE → normalised latents; ``y = [mask 4 ‖ latents 16]`` (mask 1 on latent frame 0);
* the same umT5 context goes to both towers; CFG runs the whole dual-tower pass per branch and
  applies one scale to the video and the audio velocity;
* the official sampler (:mod:`plugins.mova.scheduler`): timesteps ``t_k = 1000·σ_k`` of the
  shifted grid (the shift of the scheduler config, float32 arithmetic), the same for both towers;
  ``video_dit`` while ``t_k ≥ boundary·1000``, then ``video_dit_2``; flow-matching Euler steps
  between the σ of the 1000-point training grid nearest to ``t_k`` and ``t_{k+1}`` (then 0);
* video decoded by the VAE (in [0, 1]), audio by the DAC (fp32), trimmed to ``N_a`` samples.

Both latents travel through the core's denoising loop as one flat vector, so its CFG, Euler
step and CFG-parallel split apply to the pair unchanged.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from core import InputError, Output, Pipeline
from core.errors import WeightsError
from plugins.wan.dit import WanDiTConfig
from plugins.wan.pipeline import fit_image, image_to_tensor  # the same image fitting as Wan I2V
from plugins.wan.text_encoder import UMT5Config, UMT5Encoder, WanPromptEncoder, clean_prompt, tiny_tokenizer
from plugins.wan.vae import WanVAE

from .audio_dit import AudioDiTConfig, WanAudioModel
from .bridge import BridgeConfig, DualTowerConditionalBridge
from .dac import AudioDAC, DACConfig
from .model import MovaVideoDiT, dual_tower_forward
from .scheduler import RELEASED_SCHEDULER, MovaScheduler, read_scheduler_config

__all__ = ["MovaPipeline", "NEGATIVE_PROMPT", "audio_lengths", "read_folder_configs"]

NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，"
    "整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指"
)
"""``NEGATIVE_PROMPT`` of the official ``scripts/inference_single.py``."""

SAMPLE_RATE = 48000


def audio_lengths(num_frames: int, fps: float, hop: int = 960, sample_rate: int = SAMPLE_RATE) -> tuple[int, int]:
    """``(samples, latent frames)`` for a video of ``num_frames`` at ``fps``: (193, 24) → (386000, 403)."""
    samples = math.floor(sample_rate * num_frames / fps)
    return samples, (samples - 1) // hop + 1


# -- config.json of each folder ------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise WeightsError(f"{path} is not valid JSON: {exc}") from exc


def read_folder_configs(root: str | os.PathLike, config: dict) -> dict:
    """``config`` with each component's section replaced by its folder's ``config.json`` (when
    present): ``video_dit/``, ``audio_dit/``, ``dual_tower_bridge/``, ``audio_vae/``, ``video_vae/``
    (diffusers ``AutoencoderKLWan`` fields), ``text_encoder/`` (transformers ``UMT5Config`` fields),
    and ``scheduler/scheduler_config.json`` (the sampler's shift, σ range and grid)."""
    root = Path(root)
    config = dict(config)
    if (root / "scheduler" / "scheduler_config.json").is_file():
        config["scheduler"] = asdict(read_scheduler_config(root / "scheduler" / "scheduler_config.json"))
    try:
        if (data := _read_json(root / "video_dit" / "config.json")) is not None:
            # MOVA's WanModel takes text_dim and patch_size from its config (Wan's class ignores them)
            extra = {"text_dim": data.get("text_dim", 4096), "patch_size": tuple(data.get("patch_size", (1, 2, 2)))}
            if data.get("in_dim") == 36:
                extra["model_type"] = "i2v"
            config["video_dit"] = asdict(WanDiTConfig.from_json_dict(data, **extra))
        if (data := _read_json(root / "audio_dit" / "config.json")) is not None:
            config["audio_dit"] = asdict(AudioDiTConfig.from_json_dict(data))
        if (data := _read_json(root / "dual_tower_bridge" / "config.json")) is not None:
            config["bridge"] = asdict(BridgeConfig.from_json_dict(data))
        if (data := _read_json(root / "audio_vae" / "config.json")) is not None:
            config["dac"] = asdict(DACConfig.from_json_dict(data))
        if (data := _read_json(root / "video_vae" / "config.json")) is not None:
            config["vae"] = {"dim": data.get("base_dim", 96), "z_dim": data.get("z_dim", 16),
                             "dim_mult": tuple(data.get("dim_mult", (1, 2, 4, 4))),
                             "num_res_blocks": data.get("num_res_blocks", 2),
                             "temporal_downsample": tuple(data.get("temperal_downsample", (False, True, True)))}
        if (data := _read_json(root / "text_encoder" / "config.json")) is not None:
            config["t5"] = {"vocab_size": data["vocab_size"], "dim": data["d_model"],
                            "dim_attn": data["num_heads"] * data["d_kv"], "dim_ffn": data["d_ff"],
                            "num_heads": data["num_heads"], "num_layers": data["num_layers"],
                            "num_buckets": data.get("relative_attention_num_buckets", 32),
                            "max_distance": data.get("relative_attention_max_distance", 128),
                            "eps": data.get("layer_norm_epsilon", 1e-6)}
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"a config.json under {root} does not describe its component: {type(exc).__name__}: {exc}") from exc
    return config


def load_tokenizer(root: str | os.PathLike):
    """The ``T5TokenizerFast`` in ``<root>/tokenizer`` (padding on the right)."""
    from transformers import AutoTokenizer

    path = Path(root) / "tokenizer"
    if not path.is_dir():
        raise WeightsError(f"tokenizer folder {path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "right"
    return tokenizer


class MovaPipeline(Pipeline):
    """MOVA image+text → video+audio; see the module docstring.

    ``config``: ``video_dit`` (:class:`WanDiTConfig` fields), ``audio_dit``, ``bridge``, ``dac``, ``vae``
    (:class:`WanVAE` arguments), ``t5`` and ``scheduler`` (:class:`MovaScheduler` fields; the released
    values when absent) sections.  With ``weights`` the folder's ``config.json`` files and
    ``scheduler/scheduler_config.json`` take precedence and the tokenizer comes from ``tokenizer/``.
    """

    compilable_models = ("video_dit", "video_dit_2", "audio_dit")
    defaults: dict[str, Any] = {
        "num_inference_steps": 50, "guidance_scale": 5.0, "height": 352, "width": 640, "num_frames": 193,
        "fps": 24, "shift": None, "boundary": 0.9, "negative_prompt": NEGATIVE_PROMPT, "image": None,
    }
    """``shift`` is deprecated: the shift is the scheduler config's (``self.scheduler``), as upstream."""

    def __init__(self, config: dict, *, device="cpu", dtype=torch.float32, weights=None, seed: int = 0,
                 vae_dtype: torch.dtype = torch.float32):
        super().__init__(device=device, dtype=dtype)
        if weights is not None:
            config = read_folder_configs(weights, config)
        video_cfg = WanDiTConfig(**config["video_dit"])
        audio_cfg = AudioDiTConfig(**config["audio_dit"])
        bridge_cfg = BridgeConfig(**config["bridge"])
        dac_cfg = DACConfig(**config["dac"])
        t5_names = {f.name for f in fields(UMT5Config)}
        t5_cfg = UMT5Config(**{k: v for k, v in config["t5"].items() if k in t5_names})
        if video_cfg.in_dim != 36 or video_cfg.out_dim != 16:
            raise ValueError(f"MOVA video tower: in_dim/out_dim must be 36/16 (noise + mask + image latents), got "
                             f"{video_cfg.in_dim}/{video_cfg.out_dim}")
        checks = [("bridge visual_hidden_dim", bridge_cfg.visual_hidden_dim, "video_dit dim", video_cfg.dim),
                  ("bridge audio_hidden_dim", bridge_cfg.audio_hidden_dim, "audio_dit dim", audio_cfg.dim),
                  ("bridge visual_layers", bridge_cfg.visual_layers, "video_dit num_layers", video_cfg.num_layers),
                  ("bridge audio_layers", bridge_cfg.audio_layers, "audio_dit num_layers", audio_cfg.num_layers),
                  ("umT5 dim", t5_cfg.dim, "video_dit text_dim", video_cfg.text_dim),
                  ("umT5 dim", t5_cfg.dim, "audio_dit text_dim", audio_cfg.text_dim),
                  ("audio_vae latent_dim", dac_cfg.latent_dim, "audio_dit in_dim", audio_cfg.in_dim)]
        for a, va, b, vb in checks:
            if va != vb:
                raise ValueError(f"MOVA config: {a} {va} != {b} {vb}")

        self.scheduler = MovaScheduler(**config["scheduler"]) if "scheduler" in config else RELEASED_SCHEDULER
        self.vae_config = {"dim": 96, "z_dim": 16, "dim_mult": (1, 2, 4, 4), "num_res_blocks": 2,
                           "temporal_downsample": (False, True, True), **config["vae"]}
        with torch.random.fork_rng(devices=[]):  # seeded random weights without touching the caller's RNG
            torch.manual_seed(seed)
            self.text_encoder = UMT5Encoder(t5_cfg)
            self.video_dit = MovaVideoDiT(video_cfg)
            self.video_dit_2 = MovaVideoDiT(video_cfg)
            self.audio_dit = WanAudioModel(audio_cfg)
            self.dual_tower_bridge = DualTowerConditionalBridge(bridge_cfg)
            self.video_vae = WanVAE(**self.vae_config)
            self.audio_vae = AudioDAC(dac_cfg)
        for name, module in self.components().items():
            # both VAEs run in fp32 (the official decode of the audio is fp32)
            module.to(device=device, dtype=vae_dtype if name.endswith("_vae") else dtype).eval().requires_grad_(False)
        tokenizer = load_tokenizer(weights) if weights is not None else tiny_tokenizer(t5_cfg.text_len)
        self.prompt_encoder = WanPromptEncoder(self.text_encoder, tokenizer, video_cfg.text_len)
        self.size_multiple = self.video_vae.spatial_stride * video_cfg.patch_size[1]

    # -- arguments ------------------------------------------------------------------------------
    def check_inputs(self, args: dict[str, Any]) -> None:
        super().check_inputs(args)
        n = args["num_frames"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or (n - 1) % 4:
            raise InputError(f"num_frames must be 4k+1 (1, 5, ..., 121, 193), got {n!r}")
        fps = args["fps"]
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps <= 0:
            raise InputError(f"fps must be a number > 0, got {fps!r}")
        for key in ("height", "width"):
            if args[key] // self.size_multiple > 1024:
                raise InputError(f"{key} {args[key]} gives more than 1024 tokens per axis; RoPE holds at most 1024")
        if (n - 1) // 4 + 1 > 1024:
            raise InputError(f"num_frames {n} gives more than 1024 latent frames; RoPE holds at most 1024")
        samples, latents = audio_lengths(n, fps, self.audio_vae.hop_length, self.audio_vae.sample_rate)
        if latents > self.audio_dit.config.rope_max_positions:
            raise InputError(f"num_frames {n} at {fps} fps gives {latents} audio latent frames; the audio tower's "
                             f"rotary table holds {self.audio_dit.config.rope_max_positions}")
        shift = args["shift"]
        if shift is not None:
            # the official pipeline takes its shift from scheduler_config.json and ignores its
            # sigma_shift argument; one that would change the result is refused, not ignored
            where = f"the scheduler config's ({self.scheduler.shift:g}; scheduler/scheduler_config.json of the checkpoint)"
            if isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift == self.scheduler.shift:
                warnings.warn(f"MOVA's shift argument is deprecated and has no effect: the shift is {where}, as in the "
                              f"official pipeline", DeprecationWarning, stacklevel=3)
            else:
                raise InputError(f"shift={shift!r} cannot apply: MOVA samples with {where}, as the official pipeline "
                                 f"does (it ignores its sigma_shift argument); omit shift, or sample at another shift "
                                 f"by editing scheduler/scheduler_config.json")
        boundary = args["boundary"]
        if not isinstance(boundary, (int, float)) or isinstance(boundary, bool) or not 0.0 <= boundary <= 1.0:
            raise InputError(f"boundary must be a number in [0, 1], got {boundary!r}")
        for key in ("prompt", "negative_prompt"):
            text = args.get(key)
            if text:
                tokens = len(self.prompt_encoder.tokenizer(clean_prompt(text), add_special_tokens=True)["input_ids"])
                if tokens > self.prompt_encoder.text_len:
                    raise InputError(f"{key} is {tokens} tokens (with EOS); umT5 takes at most {self.prompt_encoder.text_len}")
        image = args["image"]
        if image is None:
            raise InputError("MOVA generates from an image and a prompt: pass image= (a PIL image or a (3,H,W) tensor in [0, 1])")
        if isinstance(image, torch.Tensor):
            ok = image.dim() == 3 and image.shape[0] == 3 or image.dim() == 4 and tuple(image.shape[:2]) == (1, 3)
            if not ok or not image.is_floating_point():
                raise InputError(f"image must be a float tensor (3,H,W) or (1,3,H,W), got {image.dtype} {tuple(image.shape)}")
            if image.numel() and (image.min() < 0 or image.max() > 1):
                raise InputError(f"image values must lie in [0, 1], got [{image.min().item():.3g}, {image.max().item():.3g}]")
        elif not hasattr(image, "convert"):
            raise InputError(f"image must be a PIL image or a tensor, got {type(image).__name__}")

    # -- stages ---------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> torch.Tensor:
        return self.prompt_encoder.encode([text])

    def encode_image(self, image, num_frames: int, height: int, width: int) -> torch.Tensor:
        """``y = [mask(4) ‖ latents(16)]`` of the video ``[image, zeros × (F−1)]``."""
        pixels = fit_image(image_to_tensor(image), height, width) * 2 - 1
        pixels = pixels.to(self.device, self.video_vae.conv1.weight.dtype)[:, :, None]
        video = torch.cat([pixels, pixels.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        latents = self.video_vae.encode(video).float()
        mask = torch.zeros_like(latents[:, :4])
        mask[:, :, 0] = 1.0
        return torch.cat([mask, latents], dim=1)

    def expert(self, timestep: torch.Tensor | float, boundary: float) -> str:
        """``video_dit`` while the timestep ``t_k`` (float32) is ``≥ boundary·1000``, else ``video_dit_2`` (as upstream)."""
        return "video_dit" if self.scheduler.is_high_noise(timestep, boundary) else "video_dit_2"

    # -- generation -----------------------------------------------------------------------------
    def generate(self, *, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                 height, width, num_frames, fps, shift, boundary, image, progress=None) -> Output:
        context = {"cond": self.encode_prompt(prompt), "uncond": self.encode_prompt(negative_prompt or "")}
        self.trace("text_embeddings", context["cond"])
        s = self.video_vae.spatial_stride
        video_shape = (1, self.video_vae.z_dim, (num_frames - 1) // 4 + 1, height // s, width // s)
        samples, audio_len = audio_lengths(num_frames, fps, self.audio_vae.hop_length, self.audio_vae.sample_rate)
        audio_shape = (1, self.audio_dit.config.in_dim, audio_len)
        nv = 1
        for d in video_shape:
            nv *= d
        na = audio_shape[1] * audio_shape[2]
        # One draw for both latents (video first), so one seed gives independent noise to each.
        x = self.noise((1, nv + na), seed, generator=generator)
        y = self.encode_image(image, num_frames, height, width)
        # the DiT gets the grid's timesteps; the Euler steps move between their snapped σ
        timesteps = self.scheduler.timesteps(num_inference_steps)
        sigmas = self.scheduler.sigmas(num_inference_steps)

        def velocity(x, sigma, branch, step):
            video_model = getattr(self, self.expert(timesteps[step], boundary))
            dtype = video_model.patch_embedding.weight.dtype
            t = timesteps[step].reshape(1).to(self.device)
            xv = x[:, :nv].reshape(video_shape).to(dtype)
            xa = x[:, nv:].reshape(audio_shape).to(dtype)
            vv, va = dual_tower_forward(video_model, self.audio_dit, self.dual_tower_bridge, xv, xa, t,
                                        context[branch].to(dtype), y.to(dtype), float(fps))
            return torch.cat([vv.float().reshape(1, -1), va.float().reshape(1, -1)], dim=1)

        x = self.denoise(x, sigmas, velocity, guidance_scale=guidance_scale, progress=progress)
        video_latents = x[:, :nv].reshape(video_shape)
        audio_latents = x[:, nv:].reshape(audio_shape)
        self.trace("latents", (video_latents, audio_latents))
        video = self.video_vae.decode(video_latents.to(self.video_vae.conv2.weight.dtype))
        video = ((video.float() + 1.0) / 2.0).clamp_(0.0, 1.0)
        audio = self.audio_vae.decode(audio_latents.to(self.audio_vae.post_quant_conv.weight.dtype), samples)
        return Output(kind="video+audio", video=video, audio=audio.float().clamp_(-1.0, 1.0), fps=float(fps),
                      sample_rate=self.audio_vae.sample_rate)
