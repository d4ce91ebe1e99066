"""The ditkit.plugins entry point: the model declaration (records of plugin contract 1.0 only)."""
from core import hookimpl
from core.spec import (
    AttentionSite,
    Capabilities,
    Conformance,
    ModelSpec,
    Preset,
    SequenceGather,
    SequenceSplit,
    SizeRange,
    UspAdapter,
    WeightFile,
    WeightsLayout,
)

from .pipeline import FluxPipeline, write_checkpoint

MAX_TOKENS = 48
TINY = {
    "max_tokens": MAX_TOKENS,
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


@hookimpl
def ditkit_register_models():
    return [
        ModelSpec(
            name="flux10-tiny",
            description="diffusers' Flux transformer with our own attention processor (tiny, random weights)",
            pipeline=FluxPipeline,
            presets={"tiny": Preset(description="random weights", config=TINY, random_weights=True,
                                    defaults={"steps": 2})},
            weights=WeightsLayout(
                description="diffusers folders transformer/, vae/ (diffusion_pytorch_model.safetensors), "
                "text_encoder/ (model.safetensors)",
                files=[WeightFile(component="transformer", path="transformer/diffusion_pytorch_model.safetensors"),
                       WeightFile(component="vae", path="vae/diffusion_pytorch_model.safetensors"),
                       WeightFile(component="text_encoder", path="text_encoder/model.safetensors")],
            ),
            compilable_models=["transformer"],
            repeated_blocks={"transformer": ["FluxTransformerBlock", "FluxSingleTransformerBlock"]},
            # image tokens split where they enter the transformer (with their position ids, so the
            # rotary table follows them), text whole on every rank at the joint site
            usp=[UspAdapter(
                component="transformer",
                heads=4,
                splits=[SequenceSplit(module="", at="input", arg="hidden_states", dim=1),
                        SequenceSplit(module="", at="input", arg="img_ids", dim=0)],
                gathers=[SequenceGather(module="proj_out", at="output", dim=1)],
                sites={"joint": AttentionSite(strategy="joint")},
            )],
            checkpoint_writer=write_checkpoint,
            capabilities=Capabilities(output="image", size_multiple=8, max_prompt_tokens=MAX_TOKENS - 1, usp=True),
            conformance=Conformance(
                call={"steps": 2},
                sizes={"height": SizeRange(min=16, max=40, multiple=8), "width": SizeRange(min=16, max=40, multiple=8)},
                uneven_call={"height": 24, "width": 40},  # (24/8)·(40/8) = 15 image tokens
            ),
        )
    ]
