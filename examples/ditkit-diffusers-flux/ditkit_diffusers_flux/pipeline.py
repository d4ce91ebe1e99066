"""Text -> image with diffusers' own modules: CLIP text encoder, FluxTransformer2DModel, AutoencoderKL.

The components are diffusers' and transformers' classes, built from the preset's config dicts
and filled by ditkit's loader from diffusers' folder layout. What is here is only the sampling
loop of diffusers' ``FluxPipeline`` on ditkit's base class (flow-matching Euler with true
classifier-free guidance): latents ``(1, C, H/s, W/s)`` (``s`` the VAE's scale) packed into 2×2
patches, so a ``H``×``W`` image is ``(H/2s)·(W/2s)`` image tokens.

Schedule: diffusers' ``FlowMatchEulerDiscreteScheduler`` with :data:`SCHEDULER_CONFIG`, the
example's published ``scheduler/scheduler_config.json``: a fixed shift of 3 (FLUX.1-dev shifts by
resolution instead), computed here by :func:`core.sampler.shifted_sigmas`. The conformance kit's
``reference-parity`` check runs diffusers' own ``FluxPipeline`` with that config
(:mod:`ditkit_diffusers_flux.reference`).

Stand-in: real Flux encodes the prompt twice (CLIP for the pooled vector, T5 for the tokens).
This example uses one small ``transformers.CLIPTextModel`` for both (its pooled output and its
token states) and transformers' byte-level ``ByT5Tokenizer``, which needs no vocabulary file.
"""
from __future__ import annotations

import torch

from core import InputError, Output, Pipeline
from core.integrations.diffusers import route_attention
from core.sampler import shifted_sigmas


SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                    "use_dynamic_shifting": False}
"""The published ``scheduler/scheduler_config.json`` (the checkpoint writer writes it): the schedule
this pipeline computes, and the one diffusers computes for the reference."""


class DiffusersFluxPipeline(Pipeline):
    compilable_models = ("transformer",)
    defaults = {"num_inference_steps": 4, "guidance_scale": 3.0, "height": 32, "width": 32,
                "shift": SCHEDULER_CONFIG["shift"], "negative_prompt": ""}

    def __init__(self, config: dict, *, device, dtype, weights=None, seed: int = 0):
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel

        super().__init__(device=device, dtype=dtype)
        self.max_tokens = config["max_tokens"]
        self.tokenizer = ByT5Tokenizer(model_max_length=self.max_tokens)
        with torch.random.fork_rng(devices=[]):  # seeded random weights, without touching the caller's RNG
            torch.manual_seed(seed)
            self.text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
            self.transformer = FluxTransformer2DModel(**config["transformer"])
            self.vae = AutoencoderKL(**config["vae"])
            if config.get("init_std"):  # diffusers zero-initialises output layers; random values exercise every path
                for p in self.transformer.parameters():
                    p.data.normal_(0, config["init_std"])
        route_attention(self.transformer)  # every attention call of the transformer through core.attention
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for module in self.components().values():
            module.to(device=device).eval()
            if dtype != torch.float32:  # (diffusers warns on every dtype cast, even a no-op one)
                module.to(dtype=dtype)

    def check_inputs(self, args):
        super().check_inputs(args)
        for key in ("prompt", "negative_prompt"):
            text = args.get(key)
            if text and len(text.encode("utf-8")) + 1 > self.max_tokens:  # +1: the end-of-sequence token
                raise InputError(f"{key} is {len(text.encode('utf-8'))} bytes; the limit is {self.max_tokens - 1}")

    def encode_prompt(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states (1, max_tokens, D), pooled (1, D)); padded to a fixed length like Flux's T5."""
        ids = self.tokenizer(text, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        out = self.text_encoder(ids)
        return out.last_hidden_state.to(self.dtype), out.pooler_output.to(self.dtype)

    def sigmas(self, num_inference_steps: int, shift: float) -> torch.Tensor:
        """``num_inference_steps + 1`` noise levels, the last 0 (:data:`SCHEDULER_CONFIG`'s fixed shift)."""
        return shifted_sigmas(num_inference_steps, shift)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``(1, C, h, w)`` → image ``(1, 3, H, W)`` in [0, 1], undoing the VAE's scaling and shift."""
        z = x / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        image = self.vae.decode(z.to(self.dtype), return_dict=False)[0].float()
        return (image / 2 + 0.5).clamp(0, 1)

    def generate(self, *, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator, height, width,
                 shift, progress=None):
        cond = {"cond": self.encode_prompt(prompt), "uncond": self.encode_prompt(negative_prompt or "")}
        self.trace("text_embeddings", cond["cond"])
        h, w = height // self.vae_scale, width // self.vae_scale
        channels = self.vae.config.latent_channels
        x = self.noise((1, channels, h, w), seed, generator=generator)
        # diffusers' FluxPipeline layout: 2x2 latent patches as tokens, ids (0, row, col); text ids zero
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(self.device, self.dtype)
        txt_ids = torch.zeros(self.max_tokens, 3, device=self.device, dtype=self.dtype)
        sigmas = self.sigmas(num_inference_steps, shift)

        def velocity(x, sigma, branch, step):
            text, pooled = cond[branch]
            out = self.transformer(hidden_states=_pack(x).to(self.dtype), timestep=sigma.reshape(1).to(self.device, self.dtype),
                                   pooled_projections=pooled, encoder_hidden_states=text, txt_ids=txt_ids,
                                   img_ids=img_ids, return_dict=False)[0]
            return _unpack(out.float(), h, w)

        x = self.denoise(x, sigmas, velocity, guidance_scale=guidance_scale, progress=progress)
        return Output(kind="image", images=self.decode(x))


def _pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def write_checkpoint(pipe: DiffusersFluxPipeline, root) -> None:
    """diffusers' folder layout: ``transformer/`` and ``vae/`` (config.json +
    diffusion_pytorch_model.safetensors), ``text_encoder/`` (config.json + model.safetensors),
    ``scheduler/scheduler_config.json`` (:data:`SCHEDULER_CONFIG`)."""
    import json
    from pathlib import Path

    root = Path(root)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    pipe.transformer.save_pretrained(root / "transformer")
    pipe.vae.save_pretrained(root / "vae")
    pipe.text_encoder.save_pretrained(root / "text_encoder")
