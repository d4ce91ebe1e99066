"""Qwen-Image's ``Conformance.reference``: diffusers' ``QwenImagePipeline`` on this plugin's weights.

The weights reach diffusers the way a user's would: the plugin's checkpoint writer
(:func:`plugins.qwen_image.plugin.write_checkpoint`, the same conversion the kit's weight checks and
``tests/qwen_image`` use) writes the published folder layout, and ``QwenImagePipeline.from_pretrained``
loads it. Everything that runs is then diffusers' and transformers' code, not the plugin's: the
prompt template and the dropped prefix (``encode_prompt``), the transformer
(``QwenImageTransformer2DModel``), the schedule (``FlowMatchEulerDiscreteScheduler`` with the
written ``scheduler_config.json``: diffusers derives μ and the sigmas itself), true CFG with its
norm rescale, the Euler steps, the latent statistics and the VAE (``AutoencoderKLQwenImage``).
The one input shared with the plugin besides the weights is the initial noise, packed by
diffusers' own ``_pack_latents``.

diffusers is a test-time dependency (the ``test`` extra): without it the import raises
``ModuleNotFoundError`` and the kit skips, naming it.
"""
from __future__ import annotations

import contextlib
import tempfile
import warnings

import torch


@contextlib.contextmanager
def _quiet():
    """No loading progress bars, notices or warnings from diffusers and transformers (the kit's
    output is its table), restored afterwards."""
    import diffusers.utils.logging as d_log
    import transformers.utils.logging as t_log

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (d_log, t_log)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def diffusers_reference(pipe, call: dict, noise: torch.Tensor) -> dict:
    """``{stage: tensor}`` in the plugin's layout (latent stages as packed tokens ``(1, L, 64)``)."""
    from diffusers import QwenImagePipeline

    from .plugin import write_checkpoint

    with tempfile.TemporaryDirectory(prefix="ditkit-qwen-ref-") as root:
        write_checkpoint(pipe, root, shards=1)
        with _quiet():
            ref = QwenImagePipeline.from_pretrained(root, torch_dtype=pipe.dtype)
    ref.to(pipe.device)
    ref.set_progress_bar_config(disable=True)

    _, channels, h, w = noise.shape
    seen: dict[str, torch.Tensor] = {}

    def first_forward(module, args, kwargs, output):  # the first call of step 0 is the conditional branch
        if "velocity" not in seen:
            seen["velocity"] = output[0]
            seen["text_embeddings"] = kwargs["encoder_hidden_states"]

    def last_latents(pipeline, step, timestep, tensors):
        seen["latents"] = tensors["latents"]
        return {}

    hook = ref.transformer.register_forward_hook(first_forward, with_kwargs=True)
    try:
        image = ref(prompt=call["prompt"], negative_prompt=call["negative_prompt"],
                    true_cfg_scale=call["guidance_scale"], num_inference_steps=call["num_inference_steps"],
                    height=call["height"], width=call["width"],
                    latents=QwenImagePipeline._pack_latents(noise, 1, channels, h, w), output_type="pt",
                    callback_on_step_end=last_latents).images
    finally:
        hook.remove()
    return {"text_embeddings": seen["text_embeddings"], "sigmas": ref.scheduler.sigmas, "velocity": seen["velocity"],
            "latents": seen["latents"], "output": image}
