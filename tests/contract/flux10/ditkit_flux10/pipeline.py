"""Text -> image with diffusers' FluxTransformer2DModel and AutoencoderKL on ditkit's Pipeline.

Written to plugin contract 1.0: the step argument is ``steps``, ``generate()`` takes no
``generator`` and the pipeline names its compilable components as a class attribute. A small
``transformers.CLIPTextModel`` (byte-level tokenizer, no vocabulary file) stands in for Flux's
two text encoders.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel

from core import InputError, Output, Pipeline
from core.sampler import shifted_sigmas

from .attention import DitkitFluxAttnProcessor


class FluxPipeline(Pipeline):
    compilable_models = ("transformer",)
    defaults = {"steps": 4, "guidance_scale": 3.5, "height": 32, "width": 32, "shift": 3.0}

    def __init__(self, config: dict, *, device, dtype, weights=None, seed: int = 0):
        super().__init__(device=device, dtype=dtype)
        self.max_tokens = config["max_tokens"]
        self.tokenizer = ByT5Tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
            self.transformer = FluxTransformer2DModel(**config["transformer"])
            self.vae = AutoencoderKL(**config["vae"])
            for p in self.transformer.parameters():  # diffusers zero-initialises output layers
                p.data.normal_(0, 0.1)
        self.transformer.set_attn_processor(DitkitFluxAttnProcessor())
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for module in self.components().values():
            module.to(device=device, dtype=dtype).eval()

    def check_inputs(self, args):
        super().check_inputs(args)
        if args["steps"] > 50:
            raise InputError(f"steps must be at most 50 for this model, got {args['steps']}")
        for key in ("prompt", "negative_prompt"):
            text = args.get(key)
            if text and len(text.encode("utf-8")) + 1 > self.max_tokens:
                raise InputError(f"{key} is {len(text.encode('utf-8'))} bytes; the limit is {self.max_tokens - 1}")

    def encode_prompt(self, text: str):
        ids = self.tokenizer(text, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        out = self.text_encoder(ids)
        return out.last_hidden_state.to(self.dtype), out.pooler_output.to(self.dtype)

    def generate(self, *, prompt, negative_prompt, steps, guidance_scale, seed, height, width, shift, progress=None):
        cond = {"cond": self.encode_prompt(prompt), "uncond": self.encode_prompt(negative_prompt or "")}
        h, w = height // self.vae_scale, width // self.vae_scale
        x = self.noise((1, self.vae.config.latent_channels, h, w), seed)
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(self.device, self.dtype)
        txt_ids = torch.zeros(self.max_tokens, 3, device=self.device, dtype=self.dtype)
        sigmas = shifted_sigmas(steps, shift)

        def velocity(x, sigma, branch, step):
            text, pooled = cond[branch]
            out = self.transformer(hidden_states=pack(x).to(self.dtype), timestep=sigma.reshape(1).to(self.device, self.dtype),
                                   pooled_projections=pooled, encoder_hidden_states=text, txt_ids=txt_ids,
                                   img_ids=img_ids, joint_attention_kwargs={"text_len": self.max_tokens},
                                   return_dict=False)[0]
            return unpack(out.float(), h, w)

        x = self.denoise(x, sigmas, velocity, guidance_scale=guidance_scale, progress=progress)
        z = x / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(z.to(self.dtype), return_dict=False)[0].float()
        return Output(kind="image", images=(image / 2 + 0.5).clamp(0, 1))


def pack(x):
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x, h, w):
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def write_checkpoint(pipe, root):
    """diffusers' folder layout: transformer/, vae/ and text_encoder/, each with its config.json."""
    from pathlib import Path

    root = Path(root)
    pipe.transformer.save_pretrained(root / "transformer")
    pipe.vae.save_pretrained(root / "vae")
    pipe.text_encoder.save_pretrained(root / "text_encoder")
