"""Wan 2.1 / 2.2 pipeline: prompt → umT5 → flow-matching Euler with CFG over the DiT → VAE → video.

One class serves every released variant (docs/models.md, Wan pipeline); the preset ``config`` says which:

* ``task="t2v"``: text to video (Wan2.1-T2V-1.3B/14B, Wan2.2-T2V-A14B);
* ``task="i2v"``: image to video through the VAE (Wan2.2-I2V-A14B): the DiT input is
  ``[noise(16) ‖ mask(4) ‖ image latents(16)]``, the image encoded as ``[image, zeros × (F−1)]``;
* ``task="ti2v"``: Wan2.2-TI2V-5B, text to video with an optional image: per-token timesteps
  ``t: (B, L)``, and with an image the clean image latent fills latent frame 0, whose tokens get
  ``t = 0`` and which is held fixed during sampling.

``two_experts=True`` (Wan2.2 A14B) holds a second DiT: ``dit`` is the high-noise expert, used
while ``t = 1000·σ ≥ 1000·boundary``, then ``dit_low``; the CFG scale follows the expert
(``guidance_scale`` for ``dit``, ``guidance_scale_low`` for ``dit_low``).

Sampling is flow-matching Euler on the shifted σ grid with ``s_max = 1`` and float timesteps
(DiffSynth's sampler), not the official UniPC solver (docs/models.md, known differences); see README.md.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F

from core import InputError, Output, Pipeline
from core.sampler import shifted_sigmas

from .dit import WanDiTConfig, WanModel
from .text_encoder import UMT5Config, UMT5Encoder, WanPromptEncoder, clean_prompt, load_tokenizer, tiny_tokenizer
from .vae import WanVAE
from .vae22 import Wan22VAE

__all__ = ["WanPipeline", "NEGATIVE_PROMPT", "expert_steps", "image_to_tensor", "fit_image"]

NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""``sample_neg_prompt`` of the official ``wan/configs/shared_config.py`` (Wan2.1 and Wan2.2)."""

_TASKS = ("t2v", "i2v", "ti2v")
_VAES = {"2.1": WanVAE, "2.2": Wan22VAE}


def _is_high_noise(sigma: float, boundary: float) -> bool:
    """Official rule: the high-noise expert runs while ``t >= boundary · 1000`` (t = 1000·σ, float32)."""
    return float(torch.tensor(sigma, dtype=torch.float32) * 1000) >= boundary * 1000


def expert_steps(steps: int, shift: float, boundary: float) -> list[str]:
    """Which expert (``"dit"`` high-noise, ``"dit_low"`` low-noise) runs at each step.

    ``expert_steps(40, 12.0, 0.875).count("dit") == 26`` (docs/models.md, Wan pipeline).
    """
    sigmas = shifted_sigmas(steps, shift)
    return ["dit" if _is_high_noise(float(s), boundary) else "dit_low" for s in sigmas[:-1]]


def image_to_tensor(image) -> torch.Tensor:
    """A PIL image or a (3,H,W) / (1,3,H,W) float tensor in [0, 1] → (1, 3, H, W) float32."""
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        return x[None] if x.dim() == 3 else x
    import numpy as np

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize to cover ``height × width`` keeping the aspect ratio, then center-crop."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    image = F.interpolate(image, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    return image[..., top:top + height, left:left + width].clamp(0, 1)


class WanPipeline(Pipeline):
    """Wan text/image-to-video pipeline; components ``dit`` (+ ``dit_low``), ``vae``, ``text_encoder``.

    ``config`` (a preset's ``config``): ``task`` (``t2v`` | ``i2v`` | ``ti2v``), ``dit`` (the
    :class:`WanDiTConfig` fields), ``two_experts``, ``vae`` (``version`` ``"2.1"`` | ``"2.2"``
    plus the VAE constructor's arguments) and ``t5`` (:class:`UMT5Config` fields).

    With ``weights`` (a checkpoint directory) the tokenizer comes from ``google/umt5-xxl`` in it
    and ``core.load`` fills the modules; without, every module gets seeded random weights
    (``seed``) and the tokenizer is :func:`tiny_tokenizer`.
    """

    defaults: dict[str, Any] = {
        "num_inference_steps": 50, "guidance_scale": 5.0, "guidance_scale_low": None, "height": 480, "width": 832,
        "num_frames": 81, "shift": 5.0, "fps": 16, "negative_prompt": NEGATIVE_PROMPT, "image": None,
        "boundary": None, "tiled": False,
    }

    def __init__(self, config: dict, *, device="cpu", dtype=torch.float32, weights=None, seed: int = 0,
                 vae_dtype: torch.dtype = torch.float32):
        super().__init__(device=device, dtype=dtype)
        config = dict(config)
        self.task = config.get("task", "t2v")
        if self.task not in _TASKS:
            raise ValueError(f"Wan config task {self.task!r} is not one of {_TASKS}")
        self.two_experts = bool(config.get("two_experts", False))
        dit_config = WanDiTConfig(**config["dit"])
        vae_config = dict(config.get("vae", {}))
        vae_cls = _VAES[str(vae_config.pop("version", "2.1"))]
        self.vae_config = dict(vae_config)  # the VAE's constructor arguments (the reference rebuilds it)
        t5_names = {f.name for f in fields(UMT5Config)}
        t5_config = UMT5Config(**{k: v for k, v in config.get("t5", {}).items() if k in t5_names})
        if t5_config.dim != dit_config.text_dim:
            raise ValueError(f"Wan config: umT5 width {t5_config.dim} != DiT text_dim {dit_config.text_dim}")

        with torch.random.fork_rng(devices=[]):  # seeded random weights without touching the caller's RNG
            torch.manual_seed(seed)
            self.text_encoder = UMT5Encoder(t5_config)
            self.dit = WanModel(dit_config)
            if self.two_experts:
                self.dit_low = WanModel(dit_config)
            self.vae = vae_cls(**vae_config)
        for name, module in self.components().items():
            module.to(device=device, dtype=vae_dtype if name == "vae" else dtype).eval().requires_grad_(False)

        tokenizer = load_tokenizer(weights) if weights is not None else tiny_tokenizer(t5_config.text_len)
        self.prompt_encoder = WanPromptEncoder(self.text_encoder, tokenizer, dit_config.text_len)
        self.patch = dit_config.patch_size
        self.pixels_per_token = self.vae.spatial_stride * self.patch[1]

    # -- arguments ------------------------------------------------------------------------------
    def resolve(self, **kwargs) -> dict[str, Any]:
        # One scale given for a two-expert model means that scale for both experts.
        if self.two_experts and kwargs.get("guidance_scale") is not None and kwargs.get("guidance_scale_low") is None:
            kwargs["guidance_scale_low"] = kwargs["guidance_scale"]
        args = super().resolve(**kwargs)
        if args.get("guidance_scale_low") is None:
            args["guidance_scale_low"] = args.get("guidance_scale")
        return args

    def check_inputs(self, args: dict[str, Any]) -> None:
        super().check_inputs(args)
        m = self.pixels_per_token  # VAE stride × patch; the base class checked the spec's size multiple
        for key in ("height", "width"):
            if args[key] // m > 1024:
                raise InputError(f"{key} {args[key]} gives {args[key] // m} tokens per axis; RoPE holds at most 1024")
        for key in ("prompt", "negative_prompt"):
            text = args.get(key)
            if text:
                # verbose=False: counting a long prompt must not print the tokenizer's length warning
                tokens = len(self.prompt_encoder.tokenizer(clean_prompt(text), add_special_tokens=True,
                                                           verbose=False)["input_ids"])
                if tokens > self.prompt_encoder.text_len:
                    raise InputError(f"{key} is {tokens} tokens (with EOS); umT5 takes at most {self.prompt_encoder.text_len}")
        n = args["num_frames"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or (n - 1) % 4:
            raise InputError(f"num_frames must be 4k+1 (1, 5, 9, ..., 81), got {n!r}")
        if (n - 1) // self.vae.temporal_stride + 1 > 1024:
            raise InputError(f"num_frames {n} gives more than 1024 latent frames; RoPE holds at most 1024")
        if not isinstance(args["tiled"], bool):
            raise InputError(f"tiled must be True or False, got {args['tiled']!r}")
        for key, low in (("shift", "> 0"), ("fps", "> 0"), ("guidance_scale_low", ">= 0")):
            value = args[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (value < 0 if low == ">= 0" else value <= 0):
                raise InputError(f"{key} must be a number {low}, got {value!r}")
        boundary = args["boundary"]
        if self.two_experts and (not isinstance(boundary, (int, float)) or not 0.0 <= boundary <= 1.0):
            raise InputError(f"boundary must be a number in [0, 1] for a two-expert model, got {boundary!r}")
        image = args["image"]
        if image is None:
            if self.task == "i2v":
                raise InputError("this image-to-video model needs image= (a PIL image or a (3,H,W) tensor in [0, 1])")
            return
        if self.task == "t2v":
            raise InputError("this text-to-video model takes no image=")
        if isinstance(image, torch.Tensor):
            if image.numel() == 0:
                raise InputError(f"image is empty, shape {tuple(image.shape)}")
            ok = image.dim() == 3 and image.shape[0] == 3 or image.dim() == 4 and tuple(image.shape[:2]) == (1, 3)
            if not ok or not image.is_floating_point():
                raise InputError(f"image must be a float tensor (3,H,W) or (1,3,H,W), got {image.dtype} {tuple(image.shape)}")
            if image.numel() and (image.min() < 0 or image.max() > 1):
                raise InputError(f"image values must lie in [0, 1], got [{image.min().item():.3g}, {image.max().item():.3g}]")
        elif not hasattr(image, "convert"):
            raise InputError(f"image must be a PIL image or a tensor, got {type(image).__name__}")

    def estimate_bytes(self, args: dict[str, Any]) -> int:
        """Lower bound of the peak: the float32 video, the DiT's token activations (about ten
        ``L × dim`` float tensors live per block) and, without tiling, the VAE decoder's last
        stage (``dim`` channels at full resolution, input and output of a conv per frame chunk)."""
        h, w, n = args.get("height"), args.get("width"), args.get("num_frames")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, w, n)):
            return 0
        frames = (n - 1) // self.vae.temporal_stride + 1
        s = self.vae.spatial_stride
        tokens = frames * (h // s // self.patch[1]) * (w // s // self.patch[2])
        shards = self.parallel.mesh.sp_degree if self.parallel is not None else 1  # USP splits the tokens
        dit = 10 * -(-tokens // shards) * self.dit.config.dim * torch.finfo(self.dtype).bits // 8
        video = 4 * 3 * n * h * w
        convs = [m.weight for m in self.vae.decoder.modules() if getattr(m, "weight", None) is not None and m.weight.dim() == 5]
        vae_dim = convs[-1].shape[1] if convs else 96  # input width of the last conv: full resolution
        decode = 0 if args.get("tiled") else 2 * 4 * vae_dim * min(n, 4) * h * w
        return video + max(dit, decode)

    # -- stages ---------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> torch.Tensor:
        """umT5 context ``(1, 512, dim)``, zero rows after the prompt's tokens."""
        return self.prompt_encoder.encode([text])

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        s = self.vae.spatial_stride
        return (1, self.vae.z_dim, (num_frames - 1) // self.vae.temporal_stride + 1, height // s, width // s)

    def encode_image(self, image, num_frames: int, height: int, width: int) -> torch.Tensor:
        """The conditioning image in latent space.

        ``i2v``: ``y = [mask(4) ‖ latents(16)]`` of the video ``[image, zeros × (F−1)]``;
        ``ti2v``: the image alone, one latent frame ``(1, 48, 1, h, w)``.
        """
        pixels = fit_image(image_to_tensor(image), height, width) * 2 - 1  # (1, 3, H, W) in [-1, 1]
        vae_dtype = self.vae.conv1.weight.dtype
        pixels = pixels.to(self.device, vae_dtype)[:, :, None]
        if self.task == "ti2v":
            return self.vae.encode(pixels).float()
        video = torch.cat([pixels, pixels.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        latents = self.vae.encode(video).float()
        mask = torch.zeros_like(latents[:, :4])
        mask[:, :, 0] = 1.0
        return torch.cat([mask, latents], dim=1)

    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Latents → video ``(B, 3, F, H, W)`` float32 in [0, 1]."""
        video = self.vae.decode(latents.to(self.vae.conv2.weight.dtype), tiled=tiled)
        return ((video.float() + 1.0) / 2.0).clamp_(0.0, 1.0)

    def expert(self, sigma: float, boundary: float | None) -> str:
        """Component name of the DiT that runs at noise level ``sigma``."""
        if not self.two_experts:
            return "dit"
        return "dit" if _is_high_noise(sigma, boundary) else "dit_low"

    # -- generation -----------------------------------------------------------------------------
    def generate(self, *, prompt, negative_prompt, num_inference_steps, guidance_scale, guidance_scale_low, seed,
                 generator, height, width, num_frames, shift, fps, image, boundary, tiled, progress=None) -> Output:
        context = {"cond": self.encode_prompt(prompt), "uncond": self.encode_prompt(negative_prompt or "")}
        self.trace("text_embeddings", context["cond"])
        shape = self.latent_shape(num_frames, height, width)
        x = self.noise(shape, seed, generator=generator)
        sigmas = shifted_sigmas(num_inference_steps, float(shift))

        y = None
        keep = None  # TI2V with an image: velocity mask that holds latent frame 0 fixed
        token_t = None  # TI2V: per-token timestep multiplier (B, L)
        if self.task == "ti2v":
            tokens = shape[2] * (shape[3] // self.patch[1]) * (shape[4] // self.patch[2])
            token_t = torch.ones(1, tokens, device=self.device)
            if image is not None:
                z0 = self.encode_image(image, num_frames, height, width)
                x[:, :, :1] = z0  # the clean image latent replaces frame 0 of the noise
                keep = torch.ones(1, 1, shape[2], 1, 1, device=self.device)
                keep[:, :, 0] = 0.0
                token_t[:, : tokens // shape[2]] = 0.0  # frame-0 tokens see t = 0
        elif image is not None:
            y = self.encode_image(image, num_frames, height, width)

        def velocity(x, sigma, branch, step):
            model = getattr(self, self.expert(float(sigma), boundary))
            t = (sigma * 1000.0).reshape(1).to(self.device)
            if token_t is not None:
                t = token_t * t
            dtype = model.patch_embedding.weight.dtype
            v = model(x.to(dtype), t, context[branch].to(dtype), y=None if y is None else y.to(dtype)).float()
            return v if keep is None else v * keep

        if self.two_experts:
            def scale(step, sigma):
                return guidance_scale if self.expert(sigma, boundary) == "dit" else guidance_scale_low
        else:
            scale = guidance_scale
        x = self.denoise(x, sigmas, velocity, guidance_scale=scale, progress=progress)
        return Output(kind="video", video=self.decode(x, tiled=tiled), fps=float(fps))
