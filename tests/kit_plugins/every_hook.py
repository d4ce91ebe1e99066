"""A plugin implementing every hook of core.hookspecs, recording that the registry called it."""
import torch.nn.functional as F

from core import hookimpl
from core.spec import AttentionKernelSpec

from ._base import example_spec

CALLED: list[str] = []


def counting_kernel(q, k, v, *, mask=None, scale=None):
    CALLED.append("kernel")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@hookimpl
def ditkit_register_models():
    CALLED.append("ditkit_register_models")
    return [example_spec().model_copy(update={"name": "every-hook", "aliases": []})]


@hookimpl
def ditkit_register_attention_kernels():
    CALLED.append("ditkit_register_attention_kernels")
    return [AttentionKernelSpec(name="counting", kernel=counting_kernel)]
