"""Key names of the Wan2.1 VAE in diffusers' layout ↔ this plugin's :class:`plugins.wan.vae.WanVAE`.

Checkpoints that ship the Wan2.1 VAE architecture in diffusers naming (``AutoencoderKLWan`` and
``AutoencoderKLQwenImage``: Qwen-Image's ``vae/diffusion_pytorch_model.safetensors``, MOVA's
``video_vae/``) load into :class:`~plugins.wan.vae.WanVAE` (official ``Wan2.1_VAE.pth`` names)
through a declared key map, with no copy of the VAE code::

    WeightFile(component="vae", path="vae/diffusion_pytorch_model.safetensors",
               key_map="plugins.wan.diffusers_vae_keys:official_key")

Public functions (names are stable; other plugins import them):

* :func:`official_key` ``(diffusers_key) -> str``: diffusers name → ``WanVAE`` name. It is the
  ``WeightFile.key_map`` of a diffusers-layout VAE file.
* :func:`diffusers_key` ``(official_key) -> str``: the inverse, for writing checkpoints in the
  diffusers layout (a plugin's ``checkpoint_writer``).
* :func:`to_official` / :func:`to_diffusers` ``(state_dict) -> dict``: both applied to a whole
  state dict.

The renaming, for the default ``num_res_blocks=2`` (every published checkpoint); both sides have
194 tensors with identical shapes:

==========================================  =====================================================
official (``WanVAE``)                       diffusers
==========================================  =====================================================
``{encoder,decoder}.conv1``                 ``{encoder,decoder}.conv_in``
``encoder.downsamples.i``                   ``encoder.down_blocks.i`` (same flat index)
``decoder.upsamples.4b+j`` (j = 0, 1, 2)    ``decoder.up_blocks.b.resnets.j``
``decoder.upsamples.4b+3``                  ``decoder.up_blocks.b.upsamplers.0``
``*.middle.0`` / ``.1`` / ``.2``            ``*.mid_block.resnets.0`` / ``.attentions.0`` / ``.resnets.1``
``*.head.0`` / ``*.head.2``                 ``*.norm_out`` / ``*.conv_out``
``conv1`` / ``conv2`` (top level)           ``quant_conv`` / ``post_quant_conv``
in a residual block: ``residual.0/2/3/6``,  ``norm1`` / ``conv1`` / ``norm2`` / ``conv2``,
``shortcut``                                ``conv_shortcut``
==========================================  =====================================================

Names inside attention (``norm.gamma``, ``to_qkv``, ``proj``) and resamplers (``resample.1``,
``time_conv``) are the same on both sides. ``decoder.upsamples`` groups ``num_res_blocks + 1``
residual blocks and one upsampler per stage, so the flat index depends on ``num_res_blocks``;
every function takes it as a keyword (default 2).

A key that is not a Wan2.1 VAE key in the source naming is returned unchanged, so the weights
loader reports it as an unexpected key under its checkpoint name instead of failing here.
"""
from __future__ import annotations

import re
from typing import Mapping, TypeVar

__all__ = ["official_key", "diffusers_key", "to_official", "to_diffusers"]

T = TypeVar("T")

# inside a residual block: official Sequential index -> diffusers attribute
_RES_TO_DIFFUSERS = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2",
                     "residual.6": "conv2", "shortcut": "conv_shortcut"}
_RES_TO_OFFICIAL = {v: k for k, v in _RES_TO_DIFFUSERS.items()}
_MID_TO_DIFFUSERS = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_MID_TO_OFFICIAL = {v: k for k, v in _MID_TO_DIFFUSERS.items()}
_TOP_TO_DIFFUSERS = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_TOP_TO_OFFICIAL = {v: k for k, v in _TOP_TO_DIFFUSERS.items()}
_HEAD_TO_DIFFUSERS = {"head.0": "norm_out", "head.2": "conv_out", "conv1": "conv_in"}
_HEAD_TO_OFFICIAL = {v: k for k, v in _HEAD_TO_DIFFUSERS.items()}


def _res_inner(rest: str, table: dict[str, str]) -> str | None:
    """Rename the part of a key inside a residual block (``residual.2.weight`` ↔ ``conv1.weight``)."""
    for src, dst in table.items():
        if rest.startswith(src + "."):
            return dst + rest[len(src):]
    return None


def official_key(key: str, *, num_res_blocks: int = 2) -> str:
    """diffusers ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage`` key → :class:`WanVAE` key.

    >>> official_key("decoder.up_blocks.1.upsamplers.0.time_conv.weight")
    'decoder.upsamples.7.time_conv.weight'
    >>> official_key("encoder.down_blocks.3.conv_shortcut.bias")
    'encoder.downsamples.3.shortcut.bias'
    """
    top, _, rest = key.partition(".")
    if top in _TOP_TO_OFFICIAL and rest in ("weight", "bias"):
        return f"{_TOP_TO_OFFICIAL[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        return key
    m = re.match(r"^(conv_in|norm_out|conv_out)\.(.+)$", rest)
    if m:
        return f"{top}.{_HEAD_TO_OFFICIAL[m.group(1)]}.{m.group(2)}"
    m = re.match(r"^mid_block\.(resnets\.\d+|attentions\.\d+)\.(.+)$", rest)
    if m and m.group(1) in _MID_TO_OFFICIAL:
        idx, inner = _MID_TO_OFFICIAL[m.group(1)], m.group(2)
        if m.group(1).startswith("resnets"):
            inner = _res_inner(inner, _RES_TO_OFFICIAL) or inner
        return f"{top}.middle.{idx}.{inner}"
    if top == "encoder":
        m = re.match(r"^down_blocks\.(\d+)\.(.+)$", rest)
        if m:
            inner = _res_inner(m.group(2), _RES_TO_OFFICIAL) or m.group(2)
            return f"encoder.downsamples.{m.group(1)}.{inner}"
        return key
    per_stage = num_res_blocks + 2  # residual blocks + one upsampler
    m = re.match(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)
    if m:
        inner = _res_inner(m.group(3), _RES_TO_OFFICIAL) or m.group(3)
        return f"decoder.upsamples.{int(m.group(1)) * per_stage + int(m.group(2))}.{inner}"
    m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", rest)
    if m:
        return f"decoder.upsamples.{int(m.group(1)) * per_stage + per_stage - 1}.{m.group(2)}"
    return key


def diffusers_key(key: str, *, num_res_blocks: int = 2) -> str:
    """:class:`WanVAE` key → diffusers key; the inverse of :func:`official_key`.

    >>> diffusers_key("decoder.upsamples.7.time_conv.weight")
    'decoder.up_blocks.1.upsamplers.0.time_conv.weight'
    >>> diffusers_key("conv2.bias")
    'post_quant_conv.bias'
    """
    top, _, rest = key.partition(".")
    if top in _TOP_TO_DIFFUSERS and rest in ("weight", "bias"):
        return f"{_TOP_TO_DIFFUSERS[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        return key
    m = re.match(r"^(conv1|head\.0|head\.2)\.(.+)$", rest)
    if m:
        return f"{top}.{_HEAD_TO_DIFFUSERS[m.group(1)]}.{m.group(2)}"
    m = re.match(r"^middle\.(\d)\.(.+)$", rest)
    if m and m.group(1) in _MID_TO_DIFFUSERS:
        inner = m.group(2)
        if m.group(1) != "1":
            inner = _res_inner(inner, _RES_TO_DIFFUSERS) or inner
        return f"{top}.mid_block.{_MID_TO_DIFFUSERS[m.group(1)]}.{inner}"
    if top == "encoder":
        m = re.match(r"^downsamples\.(\d+)\.(.+)$", rest)
        if m:
            inner = _res_inner(m.group(2), _RES_TO_DIFFUSERS) or m.group(2)
            return f"encoder.down_blocks.{m.group(1)}.{inner}"
        return key
    m = re.match(r"^upsamples\.(\d+)\.(.+)$", rest)
    if m:
        stage, j = divmod(int(m.group(1)), num_res_blocks + 2)
        if j == num_res_blocks + 1:
            return f"decoder.up_blocks.{stage}.upsamplers.0.{m.group(2)}"
        inner = _res_inner(m.group(2), _RES_TO_DIFFUSERS) or m.group(2)
        return f"decoder.up_blocks.{stage}.resnets.{j}.{inner}"
    return key


def to_official(state_dict: Mapping[str, T], *, num_res_blocks: int = 2) -> dict[str, T]:
    """A diffusers-layout state dict renamed to :class:`WanVAE` keys (values untouched)."""
    return {official_key(k, num_res_blocks=num_res_blocks): v for k, v in state_dict.items()}


def to_diffusers(state_dict: Mapping[str, T], *, num_res_blocks: int = 2) -> dict[str, T]:
    """A :class:`WanVAE` state dict renamed to diffusers keys (values untouched)."""
    return {diffusers_key(k, num_res_blocks=num_res_blocks): v for k, v in state_dict.items()}
