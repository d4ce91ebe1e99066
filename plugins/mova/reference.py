"""MOVA's independent reference: the official OpenMOSS sampling loop and scheduler, with DiffSynth-Studio's modules.

:func:`reference` is ``mova-360p``'s and ``mova-720p``'s ``Conformance.reference`` (``reference(pipe,
call, noise) -> {stage: tensor}``, :data:`core.pipeline.REFERENCE_STAGES`). It recomputes the generation
the way the official ``MOVA.__call__`` does (``mova/diffusion/pipelines/pipeline_mova.py``), from the
plugin's weights and the initial noise the plugin drew:

* text: transformers' ``UMT5EncoderModel`` (the class the release loads) over the official prompt
  cleaning, 512 tokens, rows after the prompt zeroed;
* image: diffusers' ``VideoProcessor`` and ``AutoencoderKLWan`` (the release's video VAE class),
  ``[image, zeros × (F−1)]`` encoded (mode), normalised ``(μ − mean)·(1/std)``, the 4-channel mask;
* schedule: :class:`OfficialFlowMatchPairScheduler`, a port of the official scheduler (below), set up
  from the pipeline's scheduler config (the checkpoint's ``scheduler_config.json``);
* each step: the high-noise video tower until the timestep drops below ``boundary · 1000``, then the
  low-noise one; DiffSynth-Studio's ``model_fn_mova_audio_video`` (its towers, bridge and dual-tower
  pass) on both CFG branches, ``v = v_neg + s·(v_pos − v_neg)`` on video and audio, and
  ``step_from_to`` for each modality;
* decoding: denormalise, diffusers' VAE decode, ``[-1, 1] → [0, 1]``; DiffSynth's ``DacVAE`` for the
  audio (returned by :func:`generate`, not a reference stage).

Where DiffSynth-Studio's MOVA pipeline and the official code differ, this follows the official code:
DiffSynth takes the shift from the call and steps between the inference grid's own σ; the official
scheduler takes it from the config and snaps each σ to the training grid (plugins/mova/README.md).

Port (formulas, kept in the official structure): ``FlowMatchScheduler`` of
``mova/diffusion/schedulers/flow_match.py`` and ``FlowMatchPairScheduler`` of
``mova/diffusion/schedulers/flow_match_pair.py``, and the sampling loop of ``MOVA.__call__`` in
``mova/diffusion/pipelines/pipeline_mova.py``, github.com/OpenMOSS/MOVA at commit
280c078dd047d536ac8abdacbc9abd4b356b13cf (unchanged at 595a97691123e8356a65ba9fdeee23ae81aaa471).

DiffSynth-Studio 2.1.12 is not a dependency of ditkit: it is found in ``DITKIT_MOVA_REFS`` or
``.cache/mova-refs`` (:data:`REFS_INSTALL` installs it there); missing, a ``ModuleNotFoundError``
names it and the command. Only its model files are imported, not its package ``__init__``.
"""
from __future__ import annotations

import ast
import importlib
import math
import os
import sys
import types
import typing
from dataclasses import asdict
from pathlib import Path

import torch

__all__ = ["OfficialFlowMatchPairScheduler", "REFS", "REFS_INSTALL", "diffsynth_modules", "diffsynth_model_fn",
           "import_without_init", "generate", "reference"]

REFS = Path(os.environ.get("DITKIT_MOVA_REFS", Path(__file__).resolve().parents[2] / ".cache" / "mova-refs"))
"""Where the test-only reference packages live (``DITKIT_MOVA_REFS`` overrides)."""
REFS_INSTALL = (f"python -m pip install --no-deps --target {REFS} diffsynth==2.1.12 "
                f"descript-audio-codec==1.0.0")


# ---------------------------------------------------------------------------------------------
# The official scheduler (port)


class OfficialFlowMatchPairScheduler:
    """``FlowMatchPairScheduler`` of the official code, as MOVA's ``__call__`` uses it: the
    constructor caches the ``num_train_timesteps``-point grid (``train_timesteps``/``train_sigmas``)
    at the config's shift; ``set_timesteps(N)`` builds the inference grid (``timesteps``); the
    pairs are ``(t, t)`` (video, audio); :meth:`step_from_to` steps between the training-grid σ
    nearest to two timesteps. All tensors float32, as in the original (torch's default dtype)."""

    def __init__(self, num_inference_steps=100, num_train_timesteps=1000, shift=3.0, sigma_max=1.0,
                 sigma_min=0.003 / 1.002, inverse_timesteps=False, extra_one_step=False, reverse_sigmas=False,
                 exponential_shift=False, exponential_shift_mu=None, shift_terminal=None, **_ignored):
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.inverse_timesteps = inverse_timesteps
        self.extra_one_step = extra_one_step
        self.reverse_sigmas = reverse_sigmas
        self.exponential_shift = exponential_shift
        self.exponential_shift_mu = exponential_shift_mu
        self.shift_terminal = shift_terminal
        self.train_timesteps = None
        self.train_sigmas = None
        self.set_timesteps(num_train_timesteps)
        self.set_timesteps(num_inference_steps)

    def set_timesteps(self, num_inference_steps=100, denoising_strength=1.0, shift=None):
        if shift is not None:
            self.shift = shift
        sigma_start = self.sigma_min + (self.sigma_max - self.sigma_min) * denoising_strength
        if self.extra_one_step:
            self.sigmas = torch.linspace(sigma_start, self.sigma_min, num_inference_steps + 1, dtype=torch.float32)[:-1]
        else:
            self.sigmas = torch.linspace(sigma_start, self.sigma_min, num_inference_steps, dtype=torch.float32)
        if self.inverse_timesteps:
            self.sigmas = torch.flip(self.sigmas, dims=[0])
        if self.exponential_shift:
            mu = self.exponential_shift_mu
            self.sigmas = math.exp(mu) / (math.exp(mu) + (1 / self.sigmas - 1))
        else:
            self.sigmas = self.shift * self.sigmas / (1 + (self.shift - 1) * self.sigmas)
        if self.shift_terminal is not None:
            one_minus_z = 1 - self.sigmas
            scale_factor = one_minus_z[-1] / (1 - self.shift_terminal)
            self.sigmas = 1 - (one_minus_z / scale_factor)
        if self.reverse_sigmas:
            self.sigmas = 1 - self.sigmas
        self.timesteps = self.sigmas * self.num_train_timesteps
        if self.train_timesteps is None:  # the first call (from the constructor) caches the training grid
            self.train_timesteps = self.timesteps
            self.train_sigmas = self.sigmas

    def get_pairs(self) -> torch.Tensor:
        return torch.stack([self.timesteps, self.timesteps], dim=1)

    def timestep_to_sigma(self, timestep) -> torch.Tensor:
        t_cpu = torch.tensor(float(timestep), dtype=torch.float32)
        idx = torch.argmin((self.train_timesteps - t_cpu).abs())
        return self.train_sigmas[idx]

    def step_from_to(self, model_output, timestep_from, timestep_to, sample):
        sigma_from = self.timestep_to_sigma(timestep_from)
        if timestep_to is None:
            sigma_to = torch.tensor(1.0 if (self.inverse_timesteps or self.reverse_sigmas) else 0.0, dtype=sigma_from.dtype)
        else:
            sigma_to = self.timestep_to_sigma(timestep_to)
        return sample + model_output * (sigma_to - sigma_from).to(sample.device)


# ---------------------------------------------------------------------------------------------
# DiffSynth-Studio's MOVA modules, imported without their package __init__


def import_without_init(name: str, path: Path | None) -> types.ModuleType:
    """An importable package ``name`` whose ``__init__`` is not run (its submodules load normally)."""
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []
    sys.modules[name] = module
    return module


def diffsynth_modules() -> types.SimpleNamespace:
    """DiffSynth-Studio's ``mova_audio_dit``, ``mova_dual_tower_bridge``, ``mova_audio_vae`` and
    ``wan_video_dit`` modules (``.audio``, ``.bridge``, ``.vae``, ``.wan``)."""
    root = REFS / "diffsynth"
    if not (root / "__init__.py").is_file():
        raise ModuleNotFoundError(f"the MOVA reference needs DiffSynth-Studio 2.1.12 in {REFS}: {REFS_INSTALL}",
                                  name="diffsynth")
    import_without_init("diffsynth", root)
    core = import_without_init("diffsynth.core", root / "core")
    gradient = importlib.import_module("diffsynth.core.gradient")  # the real module (inference = a plain call)
    core.gradient_checkpoint_forward = gradient.gradient_checkpoint_forward
    import_without_init("diffsynth.models", root / "models")
    audio, bridge, vae, wan = (importlib.import_module(f"diffsynth.models.{n}") for n in
                               ("mova_audio_dit", "mova_dual_tower_bridge", "mova_audio_vae", "wan_video_dit"))
    # its rotate-half helper is wrapped in torch.compile(fullgraph=True); the function itself is the same math
    fn = bridge.apply_rotary_pos_emb
    bridge.apply_rotary_pos_emb = getattr(fn, "_torchdynamo_orig_callable", fn)
    return types.SimpleNamespace(audio=audio, bridge=bridge, vae=vae, wan=wan)


def diffsynth_model_fn(ds: types.SimpleNamespace):
    """DiffSynth's ``model_fn_mova_audio_video`` from its pipeline source, without importing the pipeline
    module (whose other imports are datasets and downloads)."""
    from einops import rearrange

    path = REFS / "diffsynth" / "pipelines" / "mova_audio_video.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "model_fn_mova_audio_video")
    namespace = {"torch": torch, "rearrange": rearrange, "Optional": typing.Optional,
                 "sinusoidal_embedding_1d": ds.wan.sinusoidal_embedding_1d, "WanModel": ds.wan.WanModel,
                 "MovaAudioDit": ds.audio.MovaAudioDit, "DualTowerConditionalBridge": ds.bridge.DualTowerConditionalBridge,
                 "gradient_checkpoint_forward": ds.audio.gradient_checkpoint_forward}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["model_fn_mova_audio_video"]


def _twins(pipe, ds):
    """DiffSynth's towers, bridge and DAC holding ``pipe``'s weights (``strict=True``)."""
    def load(module, source):
        module.load_state_dict(source.state_dict(), strict=True)
        weight = next(source.parameters())
        return module.to(device=weight.device, dtype=weight.dtype).eval().requires_grad_(False)

    def video(source):
        c = source.config
        return load(ds.wan.WanModel(dim=c.dim, in_dim=c.in_dim, ffn_dim=c.ffn_dim, out_dim=c.out_dim, text_dim=c.text_dim,
                                    freq_dim=c.freq_dim, eps=c.eps, patch_size=c.patch_size, num_heads=c.num_heads,
                                    num_layers=c.num_layers, has_image_input=False), source)

    a, b, d = pipe.audio_dit.config, pipe.dual_tower_bridge.config, pipe.audio_vae.config
    audio = load(ds.audio.MovaAudioDit(dim=a.dim, in_dim=a.in_dim, ffn_dim=a.ffn_dim, out_dim=a.out_dim, text_dim=a.text_dim,
                                       freq_dim=a.freq_dim, eps=a.eps, patch_size=[1], num_heads=a.num_heads,
                                       num_layers=a.num_layers, has_image_input=False), pipe.audio_dit)
    bridge = load(ds.bridge.DualTowerConditionalBridge(
        visual_layers=b.visual_layers, audio_layers=b.audio_layers, visual_hidden_dim=b.visual_hidden_dim,
        audio_hidden_dim=b.audio_hidden_dim, audio_fps=b.audio_fps, head_dim=b.head_dim,
        interaction_strategy=b.interaction_strategy, apply_cross_rope=b.apply_cross_rope,
        apply_first_frame_bias_in_rope=b.apply_first_frame_bias_in_rope), pipe.dual_tower_bridge)
    dac = load(ds.vae.DacVAE(encoder_dim=d.encoder_dim, encoder_rates=list(d.encoder_rates), latent_dim=d.latent_dim,
                             decoder_dim=d.decoder_dim, decoder_rates=list(d.decoder_rates), sample_rate=d.sample_rate,
                             continuous=True, use_weight_norm=False), pipe.audio_vae)
    return video(pipe.video_dit), video(pipe.video_dit_2), audio, bridge, dac


def _prompt_embeds(tokenizer, text_encoder, prompt: str, max_sequence_length: int = 512) -> torch.Tensor:
    """``MOVA._get_t5_prompt_embeds``: cleaned prompt, padded to 512 tokens, rows past the prompt zeroed."""
    import html
    import re

    try:
        import ftfy
    except ImportError:  # ftfy only repairs mojibake (optional, as in ditkit)
        ftfy = None
    text = ftfy.fix_text(prompt) if ftfy is not None else prompt
    text = re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()
    inputs = tokenizer([text], padding="max_length", max_length=max_sequence_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    seq_len = int(mask.gt(0).sum())
    embeds = text_encoder(ids, mask).last_hidden_state[0, :seq_len]
    return torch.cat([embeds, embeds.new_zeros(max_sequence_length - seq_len, embeds.shape[1])])[None]


@torch.no_grad()
def generate(pipe, call: dict, noise: torch.Tensor) -> dict:
    """The official generation with ``pipe``'s weights from the plugin's packed ``noise`` (video
    latent then audio latent, flattened). Returns the reference stages plus ``audio`` (the official
    decode: ``(1, 1, hop·L)`` samples) and ``timesteps`` (what the DiT received)."""
    from diffusers.video_processor import VideoProcessor

    from plugins.wan.diffusers_twins import diffusers_vae, transformers_umt5

    ds = diffsynth_modules()
    model_fn = diffsynth_model_fn(ds)
    args = pipe.resolve(**{k: v for k, v in call.items() if k not in ("progress", "generator", "shift")})
    height, width, num_frames, fps = args["height"], args["width"], args["num_frames"], float(args["fps"])
    steps, cfg_scale, boundary = args["num_inference_steps"], args["guidance_scale"], args["boundary"]
    video_dit, video_dit_2, audio_dit, bridge, dac = _twins(pipe, ds)
    video_vae = diffusers_vae(pipe.video_vae, pipe.vae_config)
    text_encoder = transformers_umt5(pipe.text_encoder)
    device = noise.device

    scheduler = OfficialFlowMatchPairScheduler(**asdict(pipe.scheduler))  # the checkpoint's scheduler_config.json
    scheduler.set_timesteps(steps)
    paired_timesteps = scheduler.get_pairs()

    # latents: the plugin's one draw holds the video noise, then the audio noise
    z, scale, spatial = (video_vae.config.z_dim, video_vae.config.scale_factor_temporal,
                         video_vae.config.scale_factor_spatial)
    video_shape = (1, z, (num_frames - 1) // scale + 1, height // spatial, width // spatial)
    audio_num_samples = int(dac.sample_rate * num_frames / fps)
    audio_shape = (1, dac.latent_dim, (audio_num_samples - 1) // int(dac.hop_length) + 1)
    nv = math.prod(video_shape)
    latents = noise[:, :nv].reshape(video_shape).float()
    audio_latents = noise[:, nv:].reshape(audio_shape).float()

    # image condition (prepare_latents)
    processor = VideoProcessor(vae_scale_factor=spatial)
    image = processor.preprocess(args["image"], height=height, width=width)
    image = image.to(device, torch.float32)[:, :, None]
    video_condition = torch.cat([image, image.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
    latent_condition = video_vae.encode(video_condition).latent_dist.mode()
    mean = torch.tensor(video_vae.config.latents_mean, device=device).view(1, z, 1, 1, 1)
    std = torch.tensor(video_vae.config.latents_std, device=device).view(1, z, 1, 1, 1)
    latent_condition = (latent_condition - mean) * (1.0 / std)
    mask = torch.ones(1, 1, num_frames, *video_shape[3:], device=device)
    mask[:, :, 1:] = 0
    first = torch.repeat_interleave(mask[:, :, :1], dim=2, repeats=scale)
    mask = torch.cat([first, mask[:, :, 1:]], dim=2).view(1, -1, scale, *video_shape[3:]).transpose(1, 2)
    condition = torch.cat([mask, latent_condition], dim=1)

    prompt_embeds = _prompt_embeds(pipe.prompt_encoder.tokenizer, text_encoder, args["prompt"])
    negative_embeds = _prompt_embeds(pipe.prompt_encoder.tokenizer, text_encoder, args["negative_prompt"] or "")

    def predict(dit, context, timestep):
        v, a = model_fn(dit, audio_dit, bridge, video_latents=latents, audio_latents=audio_latents, timestep=timestep,
                        context=context, y=condition, frame_rate=fps)
        return v.float(), a.float()

    stages: dict = {"text_embeddings": prompt_embeds, "timesteps": paired_timesteps[:, 0].clone()}
    sigmas = []
    current, switched = video_dit, False
    boundary_timestep = boundary * scheduler.num_train_timesteps
    total = paired_timesteps.shape[0]
    for i in range(total):
        timestep, audio_timestep = paired_timesteps[i]
        if not switched and timestep.item() < boundary_timestep:
            current, switched = video_dit_2, True
        t = timestep.unsqueeze(0).to(device, torch.float32)
        video_pos, audio_pos = predict(current, prompt_embeds, t)
        if i == 0:
            stages["velocity"] = torch.cat([video_pos.reshape(1, -1), audio_pos.reshape(1, -1)], dim=1)
        if cfg_scale == 1.0:
            video_v, audio_v = video_pos, audio_pos
        else:
            video_neg, audio_neg = predict(current, negative_embeds, t)
            video_v = video_neg + cfg_scale * (video_pos - video_neg)
            audio_v = audio_neg + cfg_scale * (audio_pos - audio_neg)
        next_t = paired_timesteps[i + 1, 0] if i + 1 < total else None
        sigmas.append(scheduler.timestep_to_sigma(timestep))
        latents = scheduler.step_from_to(video_v, timestep, next_t, latents)
        audio_latents = scheduler.step_from_to(audio_v, audio_timestep, next_t, audio_latents)
    stages["sigmas"] = torch.stack([*sigmas, torch.zeros(())])
    stages["latents"] = (latents, audio_latents)

    video = video_vae.decode(latents * std + mean).sample
    stages["output"] = processor.postprocess_video(video, output_type="pt").permute(0, 2, 1, 3, 4).float()
    stages["audio"] = dac.decode(audio_latents).float()  # hop · L samples (the plugin keeps the first N_a)
    return stages


def reference(pipe, call: dict, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference stages of ``call`` (see the module docstring), in the plugin's layout: the
    velocity packed like the plugin's latent, ``latents`` as ``(video, audio)``."""
    stages = generate(pipe, call, noise)
    return {k: stages[k] for k in ("text_embeddings", "sigmas", "velocity", "latents", "output")}
