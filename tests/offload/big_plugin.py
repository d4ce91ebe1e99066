"""A test-only plugin made of declared repeated blocks, about 1 GiB of fp32 weights at its
``tiny`` preset: the disk-offload memory proof (tests/offload/test_offload.py) loads it from a
safetensors checkpoint in a subprocess and measures what the process holds."""
from __future__ import annotations

import torch
from torch import nn

from core import Output, Pipeline
from core.sampler import shifted_sigmas
from core.spec import Capabilities, ModelSpec, Preset, WeightFile, WeightsLayout

DIM, LAYERS, CHANNELS = 4096, 16, 4
"""16 blocks of a 4096x4096 fp32 linear (64 MiB each): 1 GiB in repeated blocks."""


class StackBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.tanh(self.fc(self.norm(x)))


class Stack(nn.Module):
    _repeated_blocks = ("StackBlock",)

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.proj_in = nn.Linear(CHANNELS, dim)
        self.blocks = nn.ModuleList(StackBlock(dim) for _ in range(layers))
        self.proj_out = nn.Linear(dim, CHANNELS)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(x.flatten(2).transpose(1, 2)) + sigma
        for block in self.blocks:
            tokens = block(tokens)
        return self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class StackPipeline(Pipeline):
    defaults = {"num_inference_steps": 1, "guidance_scale": 1.0, "height": 2, "width": 2}

    def __init__(self, config, *, device, dtype, weights=None, seed: int = 0):
        super().__init__(device=device, dtype=dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.dit = Stack(config.get("dim", DIM), config.get("layers", LAYERS))
        self.dit.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def generate(self, *, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator, height, width,
                 progress=None):
        x = self.noise((1, CHANNELS, height, width), seed, generator=generator)

        def velocity(x, sigma, branch, step):
            return self.dit(x.to(self.dtype), sigma.to(self.device, self.dtype)).float()

        x = self.denoise(x, shifted_sigmas(num_inference_steps, 3.0), velocity, guidance_scale=guidance_scale,
                         progress=progress)
        image = torch.sigmoid(x[:, :3])
        return Output(kind="image", images=image)


spec = ModelSpec(
    name="offload-stack",
    description="test only: 16 repeated blocks, 1 GiB of fp32 weights",
    pipeline=StackPipeline,
    presets={"tiny": Preset(description="1 GiB of blocks, random", config={}, random_weights=True),
             "small": Preset(description="the same structure, 2 MiB", config={"dim": 256}, random_weights=True)},
    weights=WeightsLayout(files=[WeightFile(component="dit", path="dit/model.safetensors")]),
    compilable_models=["dit"],
    repeated_blocks={"dit": ["StackBlock"]},
    capabilities=Capabilities(output="image", cfg=False, size_multiple=1, negative_prompt=False),
)
