"""The plugin module named by the ``ditkit.plugins`` entry point: it only declares."""
from core import hookimpl
from core.spec import (
    AttentionSite,
    Capabilities,
    Conformance,
    LoraKeyMap,
    ModelSpec,
    Preset,
    SequenceGather,
    SequenceSplit,
    SizeRange,
    UspAdapter,
    WeightFile,
    WeightsLayout,
)

TINY = {"dim": 64, "heads": 4, "joint_layers": 2, "single_layers": 2, "text_dim": 32, "vae_channels": 16}


@hookimpl
def ditkit_register_models():
    return [
        ModelSpec(
            name="example-dit",
            aliases=["example"],
            description="Example text-to-image DiT with two repeated block types",
            pipeline="ditkit_example.pipeline:ExamplePipeline",  # imported when the model is first built
            presets={
                "tiny": Preset(description="random weights, CPU seconds", config=TINY, random_weights=True),
                "base": Preset(description="wider model from a checkpoint", config={**TINY, "dim": 128, "heads": 4}),
            },
            weights=WeightsLayout(
                description="transformer/diffusion_pytorch_model.safetensors (single or sharded), "
                "vae/diffusion_pytorch_model.safetensors, text_encoder/model.safetensors",
                files=[
                    WeightFile(component="dit", path="transformer/diffusion_pytorch_model.safetensors"),
                    WeightFile(component="vae", path="vae/diffusion_pytorch_model.safetensors"),
                    WeightFile(component="text_encoder", path="text_encoder/model.safetensors"),
                ],
            ),
            compilable_models=["dit", "vae"],
            repeated_blocks={"dit": ["JointBlock", "SingleBlock"]},
            compiled_methods={"vae": ["decode"]},
            # USP: image tokens split after patch embedding, the rotary table by the same ranges,
            # text context whole (cross-attention stays local), gathered before unpatchify.
            usp=[
                UspAdapter(
                    component="dit",
                    heads="heads",
                    splits=[SequenceSplit(module="patch_embed", at="output", dim=1),
                            SequenceSplit(module="rope", at="output", dim=0)],
                    gathers=[SequenceGather(module="final", at="output", dim=1)],
                    sites={"self": AttentionSite(strategy="parallel"), "cross": AttentionSite(strategy="local")},
                )
            ],
            # LoRA files may patch the DiT; its module names are the file's names (one naming)
            lora=[LoraKeyMap(component="dit", prefixes=["transformer."])],
            # sizes are multiples of VAE scale 4 × patch 2 = 8, so token grids can be odd
            capabilities=Capabilities(output="image", size_multiple=8, max_prompt_tokens=64, usp=True),
            conformance=Conformance(
                sizes={"height": SizeRange(min=32, max=80, multiple=8), "width": SizeRange(min=32, max=80, multiple=8)},
                # (40/8)·(56/8) = 35 image tokens: remainder 1 on 2 ranks, 3 on 4 ranks
                uneven_call={"height": 40, "width": 56},
            ),
        )
    ]
