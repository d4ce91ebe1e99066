"""Its joint blocks branch on a per-instance Python bool in forward, so dynamo guards on its value and
the shared compiled forward recompiles at the second instance, during the very first call."""
from ._base import example_spec, plugin_module_hook


def _pipeline(config, **kwargs):
    from ditkit_example.model import JointBlock
    from ditkit_example.pipeline import ExamplePipeline

    def forward(self, x, context, temb, rope):
        out = JointBlock.forward(self, x, context, temb, rope)
        return out * 2 if self.doubled else out

    scaled = type("JointBlock", (JointBlock,), {"forward": forward})  # the declared block name, a new class
    pipe = ExamplePipeline(config, **kwargs)
    for i, block in enumerate(pipe.dit.joint_blocks):
        block.__class__ = scaled
        block.doubled = i % 2 == 1
    return pipe


_spec = example_spec()
spec = _spec.model_copy(update={"name": "recompiling-block", "aliases": [], "pipeline": _pipeline, "usp": [],
                                "capabilities": _spec.capabilities.model_copy(update={"usp": False})})
ditkit_register_models = plugin_module_hook(spec)
