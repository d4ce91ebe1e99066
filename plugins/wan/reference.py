"""The Wan models' independent reference: diffusers' own Wan pipelines fed this plugin's weights.

:func:`reference` is every Wan variant's ``Conformance.reference`` (``reference(pipe, call, noise) ->
{stage: tensor}``, :data:`core.pipeline.REFERENCE_STAGES`). It builds diffusers' pipeline for the
variant from twins of the plugin's modules (:mod:`plugins.wan.diffusers_twins`: the same weights in
``WanTransformer3DModel``, ``AutoencoderKLWan``, transformers' ``UMT5EncoderModel``) and lets that
pipeline do everything itself, from the initial noise the plugin drew:

* ``WanPipeline`` (T2V; TI2V-5B without an image, ``expand_timesteps=True``: a timestep per token),
  ``WanImageToVideoPipeline`` (I2V-A14B; TI2V-5B with an image); the A14B models with
  ``transformer_2`` and ``boundary_ratio`` (the expert switch and the second guidance scale are
  diffusers' own code);
* its own prompt encoding (cleaning, tokenisation to 512 tokens, zeroed padding), image
  preprocessing and VAE encoding, classifier-free guidance, Euler step, latent denormalisation,
  VAE decoding and ``[-1, 1] → [0, 1]`` postprocessing;
* its own schedule: diffusers' ``FlowMatchEulerDiscreteScheduler`` with the call's ``shift``, on
  the base grid ``linspace(1, 1/N, N)`` (= ``linspace(1, 0, N+1)[:-1]``) that diffusers' Flux
  pipelines pass as ``sigmas``. That is the sampler this plugin claims to follow: flow-matching
  Euler on the shifted grid with ``s_max = 1`` and a final σ = 0, like DiffSynth-Studio
  (README.md, "Not implemented": not the official UniPC). diffusers shifts the grid, appends the
  terminal 0 and derives the timesteps ``1000·σ`` itself.

Stages returned, in the plugin's layout: ``text_embeddings`` (the conditional prompt's embeddings
the first transformer call receives), ``sigmas`` (the scheduler's N+1 values), ``velocity`` (the
first transformer call's output: the conditional branch at the first σ), ``latents`` (what the VAE
decodes, mapped back through the VAE config's own normalisation constants) and ``output`` (the
video, ``(1, 3, F, H, W)`` in [0, 1]).

Known differences, none of which the conformance call reaches: diffusers runs guidance only for a
scale > 1 (ditkit for any scale ≠ 1); it resizes an image of another size than the call's by
stretching (ditkit covers and centre-crops); ``tiled=True`` is not mirrored (the reference decodes
untiled). diffusers computes the sinusoidal timestep features in float32 where the official Wan
(and ditkit) use float64 (``tests/wan/test_dit.py``); the tolerances in ``tests/wan/test_reference.py``
allow for it.

diffusers is a test-time dependency of ditkit: a missing one raises ``ModuleNotFoundError`` naming it.
"""
from __future__ import annotations

import functools

import torch

from .diffusers_twins import diffusers_transformer, diffusers_vae, transformers_umt5
from .vae22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

__all__ = ["reference", "shifted_grid_scheduler"]


@functools.cache
def _scheduler_class():
    from diffusers import FlowMatchEulerDiscreteScheduler

    class ShiftedGridEulerScheduler(FlowMatchEulerDiscreteScheduler):
        """diffusers' flow-matching Euler scheduler, its default grid replaced by ``linspace(1, 1/N, N)``
        (what diffusers' Flux pipelines pass as ``sigmas``); diffusers shifts it and appends σ = 0."""

        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
            if sigmas is None and timesteps is None:
                import numpy as np

                sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
            super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)

    return ShiftedGridEulerScheduler


def shifted_grid_scheduler(shift: float):
    """The diffusers scheduler the reference samples with (``shift`` as diffusers' static shift)."""
    return _scheduler_class()(num_train_timesteps=1000, shift=float(shift))


def _ensure_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the Wan reference needs diffusers (pip install 'diffusers>=0.42,<0.43', "
                                  "ditkit's test extra)", name="diffusers") from exc
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v
    from diffusers.utils import is_ftfy_available

    if not is_ftfy_available():
        # diffusers 0.42's image-to-video module calls ftfy unconditionally (a NameError without it);
        # its text-to-video module has the same cleaning with ftfy optional, as ditkit's clean_prompt
        pipeline_wan_i2v.basic_clean = pipeline_wan.basic_clean


def _record_first_call(module: torch.nn.Module, seen: dict):
    """Forward hook keeping the first call's text embeddings and output (cond branch, first σ)."""
    def hook(_module, _args, kwargs, output):
        if "velocity" not in seen:
            seen["text_embeddings"] = kwargs["encoder_hidden_states"].detach().clone()
            seen["velocity"] = (output[0] if isinstance(output, tuple) else output.sample).detach().float().clone()
    return module.register_forward_hook(hook, with_kwargs=True)


@torch.no_grad()
def reference(pipe, call: dict, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """The generation ``call`` as diffusers computes it with ``pipe``'s weights, from ``noise``
    (the plugin's initial latent). See the module docstring for the stages."""
    _ensure_diffusers()
    from diffusers import WanImageToVideoPipeline, WanPipeline

    args = pipe.resolve(**{k: v for k, v in call.items() if k not in ("progress", "generator")})
    image = args.get("image")
    two = pipe.two_experts
    transformer = diffusers_transformer(pipe.dit)
    transformer_2 = diffusers_transformer(pipe.dit_low) if two else None
    z48 = pipe.vae.z_dim == 48
    vae = diffusers_vae(pipe.vae, pipe.vae_config, *((WAN22_LATENTS_MEAN, WAN22_LATENTS_STD) if z48 else ()))
    parts = dict(tokenizer=pipe.prompt_encoder.tokenizer, text_encoder=transformers_umt5(pipe.text_encoder), vae=vae,
                 scheduler=shifted_grid_scheduler(args["shift"]), transformer=transformer, transformer_2=transformer_2,
                 boundary_ratio=args["boundary"] if two else None, expand_timesteps=pipe.task == "ti2v")
    image_mode = image is not None
    ref_pipe = WanImageToVideoPipeline(**parts) if image_mode else WanPipeline(**parts)
    ref_pipe.set_progress_bar_config(disable=True)

    seen: dict = {}
    hooks = [_record_first_call(m, seen) for m in (transformer, transformer_2) if m is not None]
    decode = vae.decode

    def recording_decode(z, *a, **k):  # what the pipeline decodes: its denormalised final latents
        seen["decoded"] = z.detach().clone()
        return decode(z, *a, **k)

    vae.decode = recording_decode
    kwargs = dict(prompt=args["prompt"], negative_prompt=args["negative_prompt"] or "", height=args["height"],
                  width=args["width"], num_frames=args["num_frames"], num_inference_steps=args["num_inference_steps"],
                  guidance_scale=args["guidance_scale"], latents=noise.float(), output_type="pt",
                  max_sequence_length=pipe.prompt_encoder.text_len)
    if two:
        kwargs["guidance_scale_2"] = args["guidance_scale_low"]
    if image_mode:
        kwargs["image"] = image
    try:
        frames = ref_pipe(**kwargs).frames  # (B, F, C, H, W) in [0, 1]
    finally:
        for h in hooks:
            h.remove()
        del vae.decode
    c = vae.config
    mean = torch.tensor(c.latents_mean, dtype=torch.float64).view(1, -1, 1, 1, 1)
    std = torch.tensor(c.latents_std, dtype=torch.float64).view(1, -1, 1, 1, 1)
    velocity = seen["velocity"]
    if image_mode and pipe.task == "ti2v":  # the image's frame is held: only the other frames move
        velocity[:, :, :1] = 0
    return {
        "text_embeddings": seen["text_embeddings"],
        "sigmas": ref_pipe.scheduler.sigmas.detach().cpu(),
        "velocity": velocity,
        "latents": ((seen["decoded"].double().cpu() - mean) / std).float(),
        "output": frames.permute(0, 2, 1, 3, 4).float(),
    }
