"""The kernels plugin module (entry point ``kernels = "plugins.kernels.plugin"`` in ``ditkit.plugins``).

It offers FlashAttention-4 as ``fa4`` where ``flash-attn-4`` is installed, and nothing otherwise:
without the package, registering this plugin costs one ``find_spec`` and changes nothing.
"""
from __future__ import annotations

from core import hookimpl
from core.spec import AttentionKernelSpec

from . import fa4


@hookimpl
def ditkit_register_attention_kernels():
    if not fa4.available():
        return []
    return [AttentionKernelSpec(name="fa4", kernel=fa4.fa4_attention,
                                description="FlashAttention-4 (flash-attn-4, CuTe DSL); SDPA for masked or float32 calls")]
