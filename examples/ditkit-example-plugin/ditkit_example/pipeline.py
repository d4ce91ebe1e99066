"""The example pipeline: text → latents (flow-matching Euler + CFG) → image."""
from __future__ import annotations

import torch

from core import InputError, Output, Pipeline
from core.sampler import shifted_sigmas

from .model import LATENT_CHANNELS, VAE_SCALE, ByteTextEncoder, ExampleDiT, TinyDecoder


class ExamplePipeline(Pipeline):
    defaults = {"num_inference_steps": 4, "guidance_scale": 3.0, "height": 64, "width": 64, "shift": 3.0}

    def __init__(self, config: dict, *, device, dtype, weights=None, seed: int = 0):
        super().__init__(device=device, dtype=dtype)
        text_dim = config.get("text_dim", 32)
        with torch.random.fork_rng(devices=[]):  # seeded random weights, without touching the caller's RNG
            torch.manual_seed(seed)
            self.text_encoder = ByteTextEncoder(text_dim, config.get("max_tokens", 64))
            self.dit = ExampleDiT(config.get("dim", 64), config.get("heads", 4), config.get("joint_layers", 2),
                                  config.get("single_layers", 2), text_dim)
            self.vae = TinyDecoder(config.get("vae_channels", 16))
        for module in self.components().values():
            module.to(device=device, dtype=dtype).eval()

    def check_inputs(self, args):
        super().check_inputs(args)
        for key in ("prompt", "negative_prompt"):
            text = args.get(key)
            if text and len(text.encode("utf-8")) > self.text_encoder.max_tokens:
                raise InputError(f"{key} is {len(text.encode('utf-8'))} bytes; the limit is {self.text_encoder.max_tokens}")

    def encode_prompt(self, text: str) -> torch.Tensor:
        ids = self.text_encoder.tokenize(text).to(self.device)[None]
        return self.text_encoder(ids)

    def generate(self, *, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator, height, width,
                 shift, progress=None):
        cond = {"cond": self.encode_prompt(prompt), "uncond": self.encode_prompt(negative_prompt or "")}
        shape = (1, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE)
        x = self.noise(shape, seed, generator=generator)
        sigmas = shifted_sigmas(num_inference_steps, shift)

        def velocity(x, sigma, branch, step):
            t = sigma.reshape(1).to(self.device)
            return self.dit(x.to(self.dtype), t, cond[branch]).float()

        x = self.denoise(x, sigmas, velocity, guidance_scale=guidance_scale, progress=progress)
        image = self.vae.decode(x.to(self.dtype)).float()
        return Output(kind="image", images=image)
