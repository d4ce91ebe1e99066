"""Qwen-Image text-to-image pipeline: prompt → Qwen2.5-VL → flow-matching Euler with true CFG over
the DiT → Wan2.1 VAE (single frame) → image.

Official behaviour (the diffusers ``QwenImagePipeline``):

* schedule: ``core.sampler.dynamic_shift_sigmas`` with ``L = (H/16)·(W/16)`` image tokens
  (exponential shift μ between 0.5 at 256 and 0.9 at 8192 tokens, stretched so the last σ is
  0.02, then 0); the DiT receives ``t/1000`` with ``t = 1000·σ`` cast to the model dtype first.
  ``shift=S`` fixes μ = ln S at every size and drops the terminal stretch: the scheduler config of
  Qwen-Image-Lightning for S = 3 (docs/models.md, few-step models);
* true CFG when ``guidance_scale > 1`` and a negative prompt is given (default ``" "``):
  ``v̂ = v_neg + s·(v_pos − v_neg)``, rescaled per token to ``‖v_pos‖`` over the 64 packed
  features (``cfg_rescale_dim=-1`` on the packed latent, which is why the loop runs on packed
  tokens);
* the two branches run one after another, each with its own real prompt length: no padded text
  key ever takes part in attention;
* the latent ``(1, 16, H/8, W/8)`` is drawn on the CPU in float32 from ``seed`` (or ``generator``);
  decoding denormalises with ``vae/config.json``'s ``latents_mean`` / ``latents_std``.

The VAE is :class:`plugins.wan.vae.WanVAE` (the same architecture), filled from the diffusers
``vae/`` file through ``plugins.wan.diffusers_vae_keys.official_key``; images run as one frame.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from core import InputError, Output, Pipeline
from core.sampler import dynamic_shift_sigmas
from plugins.wan.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WanVAE

from .dit import ROPE_POSITIONS, QwenImageDiTConfig, QwenImageTransformer, pack_latents, unpack_latents
from .text_encoder import (QwenPromptEncoder, build_config, build_text_model, load_tokenizer, read_config,
                           tiny_tokenizer)

__all__ = ["QwenImagePipeline", "ASPECT_RATIOS", "vae_kwargs"]

ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1328, 1328), "16:9": (928, 1664), "9:16": (1664, 928), "4:3": (1136, 1472), "3:4": (1472, 1136),
    "3:2": (1056, 1584), "2:3": (1584, 1056),
}
"""``aspect_ratio`` → ``(height, width)``: the official README's sizes. Its 4:3 / 3:4 entry says
1140, which is not a multiple of 16; diffusers rounds it down to 1136, which is what is listed."""


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def vae_kwargs(vae_config: dict) -> dict:
    """``WanVAE`` constructor arguments from a diffusers ``vae/config.json``."""
    unsupported = {k: vae_config[k] for k in ("is_residual", "patch_size") if vae_config.get(k)}
    if unsupported or vae_config.get("decoder_base_dim") not in (None, vae_config.get("base_dim", 96)):
        raise ValueError(f"vae/config.json describes a VAE other than the Wan2.1 architecture ({unsupported or 'decoder_base_dim'})")
    return dict(dim=vae_config.get("base_dim", 96), z_dim=vae_config.get("z_dim", 16),
                dim_mult=tuple(vae_config.get("dim_mult", (1, 2, 4, 4))),
                num_res_blocks=vae_config.get("num_res_blocks", 2),
                temporal_downsample=tuple(vae_config.get("temperal_downsample", (False, True, True))))


class QwenImagePipeline(Pipeline):
    """Components ``transformer`` (the DiT), ``text_encoder`` (Qwen2.5-VL text model), ``vae``.

    ``config`` (a preset's): ``transformer`` (diffusers ``transformer/config.json`` keys),
    ``text_encoder`` (``text_encoder/config.json``), ``vae`` (``vae/config.json``). With
    ``weights`` the JSON files found in that folder take precedence and the tokenizer comes from
    ``tokenizer/``; without, modules get seeded random weights (``seed``) and the tokenizer is
    :func:`plugins.qwen_image.text_encoder.tiny_tokenizer`.
    """

    compilable_models = ("transformer",)
    defaults: dict[str, Any] = {
        "num_inference_steps": 50, "guidance_scale": 4.0, "height": 1328, "width": 1328, "negative_prompt": " ",
        "aspect_ratio": None, "shift": None,
    }

    def __init__(self, config: dict, *, device="cpu", dtype=torch.float32, weights=None, seed: int = 0,
                 vae_dtype: torch.dtype = torch.float32):
        super().__init__(device=device, dtype=dtype)
        dit_json = read_config(weights, "transformer/config.json", config["transformer"])
        text_json = read_config(weights, "text_encoder/config.json", config["text_encoder"])
        vae_json = read_config(weights, "vae/config.json", config["vae"])
        dit_config = QwenImageDiTConfig.from_json_dict(dit_json)
        text_config = build_config(text_json)
        if text_config.text_config.hidden_size != dit_config.joint_attention_dim:
            raise ValueError(f"Qwen-Image config: text encoder width {text_config.text_config.hidden_size} != "
                             f"transformer joint_attention_dim {dit_config.joint_attention_dim}")
        self.dit_config, self.text_config, self.vae_config = dit_config, text_config, dict(vae_json)
        self.text_json = dict(text_json)

        # Seeded random weights without touching the caller's RNG, created in their final dtype so a
        # 20 B model never exists in float32 on the way to bfloat16 (core.load fills them in place).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with _default_dtype(dtype):
                self.text_encoder = build_text_model(text_config)
                self.transformer = QwenImageTransformer(dit_config)
            with _default_dtype(vae_dtype):
                self.vae = WanVAE(**vae_kwargs(vae_json))
        # the published per-channel latent statistics (the same numbers as Wan2.1's)
        self.vae.latents_mean = tuple(vae_json.get("latents_mean", WAN21_LATENTS_MEAN))
        self.vae.latents_std = tuple(vae_json.get("latents_std", WAN21_LATENTS_STD))
        for name, module in self.components().items():
            module.to(device=device, dtype=vae_dtype if name == "vae" else dtype).eval().requires_grad_(False)
        tokenizer = load_tokenizer(weights) if weights is not None else tiny_tokenizer()
        self.prompt_encoder = QwenPromptEncoder(self.text_encoder, tokenizer)
        self.patch = dit_config.patch_size

    # -- arguments ------------------------------------------------------------------------------
    def resolve(self, **kwargs) -> dict[str, Any]:
        ratio = kwargs.get("aspect_ratio")
        if ratio is not None:
            if ratio not in ASPECT_RATIOS:
                raise InputError(f"aspect_ratio {ratio!r} is not one of {sorted(ASPECT_RATIOS)}")
            h, w = ASPECT_RATIOS[ratio]
            for key, value in (("height", h), ("width", w)):
                if kwargs.get(key) not in (None, value):
                    raise InputError(f"aspect_ratio {ratio!r} means {key} {value}, but {key}={kwargs[key]!r} was given")
                kwargs[key] = value
        return super().resolve(**kwargs)

    def check_inputs(self, args: dict[str, Any]) -> None:
        super().check_inputs(args)  # sizes: positive multiples of 16 (VAE stride 8 × patch 2)
        lengths = [self.prompt_encoder.check(args["prompt"], "prompt")]
        if args.get("negative_prompt") is not None:
            lengths.append(self.prompt_encoder.check(args["negative_prompt"], "negative_prompt"))
        shift = args.get("shift")
        if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift <= 0):
            raise InputError(f"shift must be a number > 0 (or None for the size-dependent shift), got {shift!r}")
        grid = max(args["height"], args["width"]) // (8 * self.patch)
        # image rows/columns reach ±grid/2, text positions grid/2 + its length (all within the tables)
        if grid // 2 + max(lengths) > ROPE_POSITIONS:
            raise InputError(f"height/width {args['height']}x{args['width']} with {max(lengths)} prompt tokens put "
                             f"rotary positions past {ROPE_POSITIONS}")

    # -- stages ---------------------------------------------------------------------------------
    def sigmas(self, num_inference_steps: int, height: int, width: int, shift: float | None = None) -> torch.Tensor:
        """The σ grid (``num_inference_steps + 1`` values, last 0) for an image of ``height × width``:
        the dynamic shift of ``scheduler/scheduler_config.json`` at ``(H/16)·(W/16)`` image tokens, or
        with ``shift`` the fixed exponential shift μ = ln(shift) without terminal stretch (the
        Qwen-Image-Lightning config: ``base_shift = max_shift = ln 3``, ``shift_terminal = None``)."""
        tokens = (height // (8 * self.patch)) * (width // (8 * self.patch))
        if shift is not None:
            return dynamic_shift_sigmas(num_inference_steps, tokens, mu=math.log(shift), shift_terminal=None)
        return dynamic_shift_sigmas(num_inference_steps, tokens, base_seq_len=256, max_seq_len=8192,
                                    base_shift=0.5, max_shift=0.9, shift_terminal=0.02)

    def encode_prompt(self, text: str) -> torch.Tensor:
        """``(1, L, 3584)``: the prompt's real tokens after the template prefix."""
        return self.prompt_encoder.encode(text, self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(1, 16, h, w)`` → image ``(1, 3, 8h, 8w)`` float32 in [0, 1]."""
        vae_dtype = self.vae.conv2.weight.dtype
        image = self.vae.decode(latents[:, :, None].to(vae_dtype))[:, :, 0]
        return ((image.float() + 1.0) / 2.0).clamp_(0.0, 1.0)

    # -- generation -----------------------------------------------------------------------------
    def generate(self, *, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator, height,
                 width, aspect_ratio=None, shift=None, progress=None) -> Output:
        do_cfg = guidance_scale > 1.0 and negative_prompt is not None
        context = {"cond": self.encode_prompt(prompt)}
        self.trace("text_embeddings", context["cond"])
        if do_cfg:
            context["uncond"] = self.encode_prompt(negative_prompt)
        h, w = height // 8, width // 8
        x = pack_latents(self.noise((1, self.vae.z_dim, h, w), seed, generator=generator), self.patch)
        sigmas = self.sigmas(num_inference_steps, height, width, shift)
        dit = self.transformer
        dtype = dit.img_in.weight.dtype

        def velocity(x, sigma, branch, step):
            # diffusers: timestep t = 1000·σ in the latent dtype, the model gets t / 1000
            t = ((sigma * 1000.0).to(dtype) / 1000.0).reshape(1).to(self.device)
            latents = unpack_latents(x, h, w, self.patch)
            v = dit(latents.to(dtype), t, context[branch].to(dtype))
            return pack_latents(v.float(), self.patch)

        x = self.denoise(x, sigmas, velocity, guidance_scale=guidance_scale if do_cfg else 1.0,
                         cfg_rescale_dim=-1, progress=progress)
        return Output(kind="image", images=self.decode(unpack_latents(x, h, w, self.patch)))
