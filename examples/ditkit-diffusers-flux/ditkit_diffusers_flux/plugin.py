"""The plugin module named by the ``ditkit.plugins`` entry point: it only declares.

The USP adapter is derived from diffusers' own ``FluxTransformer2DModel._cp_plan`` (built on the
meta device, so declaring costs no memory): the image tokens split at the model input, the text
kept whole on every rank (the router finds the joint ``[text, image]`` attention itself), gathered
after ``proj_out``.
"""
import torch

from core import hookimpl
from core.spec import Capabilities, Conformance, ModelSpec, Preset, SizeRange, WeightFile, WeightsLayout

from .pipeline import DiffusersFluxPipeline, write_checkpoint

MAX_TOKENS = 48
TINY = {
    "max_tokens": MAX_TOKENS,
    "init_std": 0.1,
    "text_encoder": {"vocab_size": 384, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": MAX_TOKENS, "projection_dim": 16,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0},
    "transformer": {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                    "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 32,
                    "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)},
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8, 8, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
            "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.3611,
            "shift_factor": 0.1159},
}


def _usp_adapter():
    from diffusers import FluxTransformer2DModel

    from core.integrations.diffusers import route_attention, usp_from_cp_plan

    with torch.device("meta"):
        model = FluxTransformer2DModel(**TINY["transformer"])
    route_attention(model)
    return usp_from_cp_plan(model, component="transformer")


@hookimpl
def ditkit_register_models():
    return [
        ModelSpec(
            name="diffusers-flux",
            aliases=["dflux"],
            description="diffusers' FluxTransformer2DModel + AutoencoderKL, unchanged (tiny config; CLIP stand-in text encoder)",
            pipeline=DiffusersFluxPipeline,
            presets={"tiny": Preset(description="random weights, CPU seconds", config=TINY, random_weights=True)},
            weights=WeightsLayout(
                description="diffusers folders: transformer/ and vae/ (diffusion_pytorch_model.safetensors), "
                "text_encoder/ (model.safetensors), each with its config.json",
                files=[
                    WeightFile(component="transformer", path="transformer/diffusion_pytorch_model.safetensors"),
                    WeightFile(component="vae", path="vae/diffusion_pytorch_model.safetensors"),
                    WeightFile(component="text_encoder", path="text_encoder/model.safetensors"),
                ],
            ),
            compilable_models=["transformer"],  # blocks found from diffusers' own _repeated_blocks
            usp=[_usp_adapter()],
            checkpoint_writer=write_checkpoint,
            capabilities=Capabilities(output="image", size_multiple=8, max_prompt_tokens=MAX_TOKENS - 1, usp=True),
            # H×W images are (H/8)·(W/8) image tokens
            conformance=Conformance(
                sizes={"height": SizeRange(min=16, max=48, multiple=8), "width": SizeRange(min=16, max=48, multiple=8)},
                uneven_call={"height": 24, "width": 40},  # 3×5 = 15 image tokens: remainder 1 on 2 ranks, 3 on 4
                # diffusers' own FluxPipeline fed this plugin's modules and the published scheduler config
                reference="ditkit_diffusers_flux.reference:flux_pipeline_reference",
            ),
        )
    ]
