"""The example's ``Conformance.reference``: diffusers' own ``FluxPipeline`` fed this plugin's modules.

What diffusers computes itself, not taken from the plugin: the prompt encoding (``encode_prompt``:
its tokenizer calls, the CLIP pooled vector and the token states of the second encoder, here the
same stand-in CLIP model), the schedule (``FlowMatchEulerDiscreteScheduler`` built from the
example's published :data:`~ditkit_diffusers_flux.pipeline.SCHEDULER_CONFIG`: diffusers derives
the sigmas from the step count), the latent packing and image ids, true classifier-free guidance,
the Euler steps, the VAE's scaling and shift, the decoding and the image post-processing.

What it shares with the plugin: the weights and the initial noise (handed to ``FluxPipeline`` as
``latents``, packed by diffusers' ``_pack_latents``). The transformer is rebuilt from its config
and the plugin's state dict, so its attention runs through diffusers' own processors, not the
ditkit attention backend that ``route_attention`` set on the plugin's processors (that routing
is under test). The VAE and the text encoder are the plugin's modules unchanged (diffusers' and transformers' classes).
"""
from __future__ import annotations

import torch


def flux_pipeline_reference(pipe, call: dict, noise: torch.Tensor) -> dict:
    """``{stage: tensor}`` in the plugin's layout (latent stages unpacked to ``(1, C, h, w)``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from .pipeline import SCHEDULER_CONFIG

    transformer = FluxTransformer2DModel.from_config(pipe.transformer.config)
    transformer.load_state_dict(pipe.transformer.state_dict())
    transformer.to(device=pipe.device).eval()
    if pipe.dtype != torch.float32:  # (diffusers warns on every dtype cast, even a no-op one)
        transformer.to(dtype=pipe.dtype)
    # the published config; a caller's `shift` (a generation argument) replaces its shift, as it would in diffusers
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG, shift=call["shift"])
    ref = FluxPipeline(scheduler=scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                       text_encoder_2=pipe.text_encoder, tokenizer_2=pipe.tokenizer, transformer=transformer)
    ref.set_progress_bar_config(disable=True)

    height, width = call["height"], call["width"]
    _, channels, h, w = noise.shape
    seen: dict[str, torch.Tensor] = {}

    def first_forward(module, args, kwargs, output):  # the first call of step 0 is the conditional branch
        if "velocity" not in seen:
            seen["velocity"] = output[0]
            seen["text_embeddings"] = (kwargs["encoder_hidden_states"], kwargs["pooled_projections"])

    def last_latents(pipeline, step, timestep, tensors):
        seen["latents"] = tensors["latents"]
        return {}

    hook = transformer.register_forward_hook(first_forward, with_kwargs=True)
    try:
        image = ref(prompt=call["prompt"], negative_prompt=call["negative_prompt"] or "",
                    true_cfg_scale=call["guidance_scale"], num_inference_steps=call["num_inference_steps"],
                    height=height, width=width, max_sequence_length=pipe.max_tokens,
                    latents=FluxPipeline._pack_latents(noise, 1, channels, h, w), output_type="pt",
                    callback_on_step_end=last_latents).images
    finally:
        hook.remove()
    scale = ref.vae_scale_factor
    return {
        "text_embeddings": seen["text_embeddings"],
        "sigmas": scheduler.sigmas,
        "velocity": FluxPipeline._unpack_latents(seen["velocity"], height, width, scale),
        "latents": FluxPipeline._unpack_latents(seen["latents"], height, width, scale),
        "output": image,
    }
