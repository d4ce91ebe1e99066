"""A JointBlock whose compiled path differs from eager (a small nonlinear change only while compiling)."""
import torch
from ditkit_example import model
from ditkit_example.pipeline import ExamplePipeline

from ._base import example_spec, plugin_module_hook


class JointBlock(model.JointBlock):
    def forward(self, x, context, temb, rope):
        out = super().forward(x, context, temb, rope)
        return out + 1e-3 * torch.tanh(out) if torch.compiler.is_compiling() else out  # not removable by LayerNorm


class DriftingPipeline(ExamplePipeline):
    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        for block in self.dit.joint_blocks:
            block.__class__ = JointBlock


spec = example_spec().model_copy(update={"name": "wrong-compile", "aliases": [], "pipeline": DriftingPipeline})
ditkit_register_models = plugin_module_hook(spec)
