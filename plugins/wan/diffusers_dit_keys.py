"""Module names of the Wan DiT in diffusers' layout (``WanTransformer3DModel``) → this plugin's
:class:`plugins.wan.dit.WanModel` (the official ``WanModel`` names).

LoRA files trained with diffusers or PEFT on ``WanTransformer3DModel`` name diffusers' modules
(``blocks.0.attn1.to_q``); kohya/ComfyUI and lightx2v files name the official ones
(``blocks.0.self_attn.q``). The plugin declares both namings in ``ModelSpec.lora`` and the core
picks, per file, the one its names resolve under (docs/lora.md)::

    LoraKeyMap(component="dit", prefixes=["transformer."],
               namings={"official": None, "diffusers": "plugins.wan.diffusers_dit_keys:official_module"})

==========================================  ============================================
diffusers                                   official
==========================================  ============================================
``blocks.i.attn1.to_q/to_k/to_v/to_out.0``  ``blocks.i.self_attn.q/k/v/o``
``blocks.i.attn2.…``                        ``blocks.i.cross_attn.…``
``blocks.i.attn{1,2}.norm_q/norm_k``        ``blocks.i.{self,cross}_attn.norm_q/norm_k``
``blocks.i.ffn.net.0.proj`` / ``net.2``     ``blocks.i.ffn.0`` / ``ffn.2``
``blocks.i.norm2`` / ``norm3``              ``blocks.i.norm3`` / ``norm2`` (the cross-attention norm is diffusers' ``norm2``)
``condition_embedder.text_embedder.linear_1/2``  ``text_embedding.0/2``
``condition_embedder.time_embedder.linear_1/2``  ``time_embedding.0/2``
``condition_embedder.time_proj``            ``time_projection.1``
``proj_out``                                ``head.head``
``patch_embedding``                         ``patch_embedding``
==========================================  ============================================

The same table (for parameters) is checked against diffusers in ``tests/wan/test_dit.py``.
"""
from __future__ import annotations

import re

__all__ = ["official_module"]

_TOP = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "norm_q": "norm_q", "norm_k": "norm_k"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def official_module(name: str) -> str | None:
    """A diffusers module name → the official one; ``None`` for a name that is not a diffusers Wan
    DiT module (the core then reports the key as matching nothing)."""
    if name in _TOP:
        return _TOP[name]
    m = _BLOCK.match(name)
    if not m:
        return None
    i, rest = m.groups()
    for attn, official in (("attn1.", "self_attn."), ("attn2.", "cross_attn.")):
        if rest.startswith(attn) and rest[len(attn):] in _ATTN:
            return f"blocks.{i}.{official}{_ATTN[rest[len(attn):]]}"
    inner = {"ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "norm2": "norm3", "norm3": "norm2"}.get(rest)
    return f"blocks.{i}.{inner}" if inner else None
