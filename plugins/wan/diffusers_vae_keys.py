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

The renaming is one table, :data:`RENAMES` (with :data:`BLOCK_RENAMES` inside residual blocks),
of ``(official template, diffusers template)`` pairs that both functions read, each in its own
direction: ``conv1``/``conv2`` at the top are ``quant_conv``/``post_quant_conv``; an encoder's or
decoder's ``conv1``/``head.0``/``head.2`` are ``conv_in``/``norm_out``/``conv_out``;
``middle.0/1/2`` are ``mid_block.resnets.0``/``attentions.0``/``resnets.1``; ``encoder.downsamples.i``
is ``encoder.down_blocks.i``; ``decoder.upsamples`` groups ``num_res_blocks + 1`` residual blocks and
one upsampler per stage under one flat index, which diffusers splits into
``up_blocks.<stage>.resnets.<j>`` and ``up_blocks.<stage>.upsamplers.0`` (so every function takes
``num_res_blocks``, default 2, as in every published checkpoint: 194 tensors on both sides, with
identical shapes). Names inside attention (``norm.gamma``, ``to_qkv``, ``proj``) and resamplers
(``resample.1``, ``time_conv``) are the same on both sides.

A key that is not a Wan2.1 VAE key in the source naming is returned unchanged, so the weights
loader reports it as an unexpected key under its checkpoint name instead of failing here.
"""
from __future__ import annotations

import re
from typing import Mapping, TypeVar

__all__ = ["official_key", "diffusers_key", "to_official", "to_diffusers"]

T = TypeVar("T")

RENAMES: tuple[tuple[str, str], ...] = (
    ("conv1.{wb}", "quant_conv.{wb}"),
    ("conv2.{wb}", "post_quant_conv.{wb}"),
    ("{side}.conv1.{rest}", "{side}.conv_in.{rest}"),
    ("{side}.head.0.{rest}", "{side}.norm_out.{rest}"),
    ("{side}.head.2.{rest}", "{side}.conv_out.{rest}"),
    ("{side}.middle.0.{block}", "{side}.mid_block.resnets.0.{block}"),
    ("{side}.middle.1.{rest}", "{side}.mid_block.attentions.0.{rest}"),
    ("{side}.middle.2.{block}", "{side}.mid_block.resnets.1.{block}"),
    ("encoder.downsamples.{i}.{block}", "encoder.down_blocks.{i}.{block}"),
    ("decoder.upsamples.{resnet}.{block}", "decoder.up_blocks.{stage}.resnets.{j}.{block}"),
    ("decoder.upsamples.{upsampler}.{rest}", "decoder.up_blocks.{stage}.upsamplers.0.{rest}"),
)
"""The one renaming table, ``(official template, diffusers template)``, read left to right by
:func:`diffusers_key` and right to left by :func:`official_key`. Fields: ``side`` is ``encoder``
or ``decoder``; ``wb`` ``weight`` or ``bias``; ``rest`` any tail; ``i``, ``stage``, ``j`` indices;
``block`` the tail inside a block (renamed by :data:`BLOCK_RENAMES` where it is a residual
block's, unchanged otherwise: resamplers). ``resnet`` / ``upsampler`` are the flat index into
``decoder.upsamples``: ``stage · (num_res_blocks + 2) + j`` for residual block ``j`` of a stage,
``stage · (num_res_blocks + 2) + num_res_blocks + 1`` for its upsampler."""

BLOCK_RENAMES: tuple[tuple[str, str], ...] = (
    ("residual.0", "norm1"), ("residual.2", "conv1"), ("residual.3", "norm2"), ("residual.6", "conv2"),
    ("shortcut", "conv_shortcut"),
)
"""Inside a residual block: official ``Sequential`` index or attribute, diffusers attribute."""

_FIELDS = {"side": r"encoder|decoder", "wb": r"weight|bias", "rest": r".+", "block": r".+", "i": r"\d+",
           "stage": r"\d+", "j": r"\d+", "resnet": r"\d+", "upsampler": r"\d+"}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for k, p in enumerate(parts)))


_COMPILED = [((official, _pattern(official)), (diffusers, _pattern(diffusers))) for official, diffusers in RENAMES]


def _rename_block(tail: str, to_diffusers: bool) -> str:
    for official, diffusers in BLOCK_RENAMES:
        src, dst = (official, diffusers) if to_diffusers else (diffusers, official)
        if tail.startswith(src + "."):
            return dst + tail[len(src):]
    return tail


def _indices(fields: dict[str, str], per_stage: int) -> dict[str, str] | None:
    """Add the other side's index fields (``resnet``/``upsampler`` ↔ ``stage``, ``j``); ``None``
    when a flat ``decoder.upsamples`` index is not of the kind (residual block, upsampler) the rule names."""
    out = dict(fields)
    for flat, is_upsampler in (("resnet", False), ("upsampler", True)):
        if flat in fields:  # official -> diffusers
            stage, j = divmod(int(fields[flat]), per_stage)
            if (j == per_stage - 1) != is_upsampler:
                return None
            out.update(stage=str(stage), j=str(j))
    if "stage" in fields:  # diffusers -> official
        flat = int(fields["stage"]) * per_stage + int(fields.get("j", per_stage - 1))
        out.update(resnet=str(flat), upsampler=str(flat))
    return out


def _convert(key: str, to_diffusers: bool, num_res_blocks: int) -> str:
    """``key`` renamed by the first rule of :data:`RENAMES` whose source side matches; unchanged when none does."""
    for official, diffusers in _COMPILED:
        (_, source), (target, _) = (official, diffusers) if to_diffusers else (diffusers, official)
        m = source.fullmatch(key)
        fields = _indices(m.groupdict(), num_res_blocks + 2) if m else None
        if fields is None:
            continue
        if "block" in fields:
            fields["block"] = _rename_block(fields["block"], to_diffusers)
        return target.format(**fields)
    return key


def official_key(key: str, *, num_res_blocks: int = 2) -> str:
    """diffusers ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage`` key → :class:`WanVAE` key.

    >>> official_key("decoder.up_blocks.1.upsamplers.0.time_conv.weight")
    'decoder.upsamples.7.time_conv.weight'
    >>> official_key("encoder.down_blocks.3.conv_shortcut.bias")
    'encoder.downsamples.3.shortcut.bias'
    """
    return _convert(key, to_diffusers=False, num_res_blocks=num_res_blocks)


def diffusers_key(key: str, *, num_res_blocks: int = 2) -> str:
    """:class:`WanVAE` key → diffusers key; the inverse of :func:`official_key`.

    >>> diffusers_key("decoder.upsamples.7.time_conv.weight")
    'decoder.up_blocks.1.upsamplers.0.time_conv.weight'
    >>> diffusers_key("conv2.bias")
    'post_quant_conv.bias'
    """
    return _convert(key, to_diffusers=True, num_res_blocks=num_res_blocks)


def to_official(state_dict: Mapping[str, T], *, num_res_blocks: int = 2) -> dict[str, T]:
    """A diffusers-layout state dict renamed to :class:`WanVAE` keys (values untouched)."""
    return {official_key(k, num_res_blocks=num_res_blocks): v for k, v in state_dict.items()}


def to_diffusers(state_dict: Mapping[str, T], *, num_res_blocks: int = 2) -> dict[str, T]:
    """A :class:`WanVAE` state dict renamed to diffusers keys (values untouched)."""
    return {diffusers_key(k, num_res_blocks=num_res_blocks): v for k, v in state_dict.items()}
