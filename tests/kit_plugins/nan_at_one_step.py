"""The example with a schedule that is NaN at one step only: Qwen-Image's terminal stretch divided
0 by 0 when the only σ is 1 (a bug that shipped once). Every check at the kit's two steps passes;
``end-to-end``, which also runs one step, must fail."""
import torch
from ditkit_example.pipeline import ExamplePipeline

from ._base import example_spec, plugin_module_hook


def stretched(sigmas, terminal: float = 0.02):
    """σ' = 1 − (1 − σ)·(1 − terminal)/(1 − σ_last), for every σ but the final 0 (0/0 at one step)."""
    head = sigmas[:-1]
    return torch.cat([1.0 - (1.0 - head) * (1.0 - terminal) / (1.0 - head[-1]), sigmas[-1:]])


class NanAtOneStep(ExamplePipeline):
    def denoise(self, x, sigmas, velocity, **kwargs):
        return super().denoise(x, stretched(sigmas), velocity, **kwargs)


spec = example_spec().model_copy(update={"name": "nan-at-one-step", "aliases": [], "pipeline": NanAtOneStep})
ditkit_register_models = plugin_module_hook(spec)
