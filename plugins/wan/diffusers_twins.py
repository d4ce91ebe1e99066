"""Independent twins of this plugin's modules, built from its weights: diffusers' and transformers' own classes.

The parity tests and the reference generation (:mod:`plugins.wan.reference`, MOVA's reference) run
these instead of the plugin's code, so a bug in the plugin's modules shows up as a difference:

* :func:`diffusers_transformer`: ``diffusers.WanTransformer3DModel`` from a :class:`~plugins.wan.dit.WanModel`;
* :func:`diffusers_vae`: ``diffusers.AutoencoderKLWan`` from a Wan2.1 or Wan2.2 VAE;
* :func:`transformers_umt5`: ``transformers.UMT5EncoderModel`` from a :class:`~plugins.wan.text_encoder.UMT5Encoder`.

The key maps (:func:`dit_diffusers_key`, :func:`vae22_diffusers_key`; the Wan2.1 VAE's is
:mod:`plugins.wan.diffusers_vae_keys`, umT5's :func:`plugins.wan.text_encoder.official_to_transformers`)
rename only: every twin loads ``strict=True`` (umT5: all but the tied ``encoder.embed_tokens``), so a
key or shape the two sides disagree on fails loudly. diffusers is a test-time dependency of ditkit:
it is imported inside the functions.
"""
from __future__ import annotations

import re

import torch

from .diffusers_vae_keys import to_diffusers as _vae21_to_diffusers
from .text_encoder import official_to_transformers

__all__ = ["dit_diffusers_key", "vae22_diffusers_key", "diffusers_transformer", "diffusers_vae", "transformers_umt5"]

_DIT_TOP = (
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
)
_DIT_BLOCK = (
    (r"\.self_attn\.", ".attn1."), (r"\.cross_attn\.", ".attn2."),
    (r"\.attn(\d)\.q\.", r".attn\1.to_q."), (r"\.attn(\d)\.k\.", r".attn\1.to_k."),
    (r"\.attn(\d)\.v\.", r".attn\1.to_v."), (r"\.attn(\d)\.o\.", r".attn\1.to_out.0."),
    (r"\.norm3\.", ".norm2."), (r"\.ffn\.0\.", ".ffn.net.0.proj."), (r"\.ffn\.2\.", ".ffn.net.2."),
    (r"\.modulation$", ".scale_shift_table"),
)


def dit_diffusers_key(key: str) -> str:
    """Official Wan DiT key → ``WanTransformer3DModel`` key (DiffSynth-Studio's converter table)."""
    for pattern, repl in _DIT_TOP:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    for pattern, repl in _DIT_BLOCK:
        key = re.sub(pattern, repl, key)
    return key


def vae22_diffusers_key(key: str) -> str:
    """Official Wan2.2 VAE key → ``AutoencoderKLWan(is_residual=True)`` key."""
    k = key
    k = re.sub(r"^encoder\.downsamples\.(\d+)\.downsamples\.2\.", r"encoder.down_blocks.\1.downsampler.", k)
    k = re.sub(r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", k)
    k = re.sub(r"^decoder\.upsamples\.(\d+)\.upsamples\.3\.", r"decoder.up_blocks.\1.upsampler.", k)
    k = re.sub(r"^decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.", r"decoder.up_blocks.\1.resnets.\2.", k)
    k = re.sub(r"^(encoder|decoder)\.conv1\.", r"\1.conv_in.", k)
    k = re.sub(r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0.", k)
    k = re.sub(r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0.", k)
    k = re.sub(r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1.", k)
    k = re.sub(r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out.", k)
    k = re.sub(r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out.", k)
    k = re.sub(r"^conv1\.", "quant_conv.", k)
    k = re.sub(r"^conv2\.", "post_quant_conv.", k)
    for a, b in (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
                 ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut.")):
        k = k.replace(a, b)
    return k


def _load(module: torch.nn.Module, state: dict, like: torch.nn.Module) -> torch.nn.Module:
    module.load_state_dict(state, strict=True)
    weight = next(like.parameters())
    module.to(device=weight.device)
    if next(module.parameters()).dtype != weight.dtype:
        module.to(dtype=weight.dtype)
    return module.eval().requires_grad_(False)


def diffusers_transformer(dit) -> torch.nn.Module:
    """``diffusers.WanTransformer3DModel`` holding ``dit``'s weights (a :class:`~plugins.wan.dit.WanModel`)."""
    from diffusers import WanTransformer3DModel

    c = dit.config
    twin = WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
        in_channels=c.in_dim, out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim,
        ffn_dim=c.ffn_dim, num_layers=c.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=c.eps, rope_max_seq_len=c.rope_max_positions)
    return _load(twin, {dit_diffusers_key(k): v for k, v in dit.state_dict().items()}, dit)


def diffusers_vae(vae, config: dict, latents_mean=None, latents_std=None) -> torch.nn.Module:
    """``diffusers.AutoencoderKLWan`` holding ``vae``'s weights. ``config`` is the plugin VAE's
    constructor arguments (``dim``, ``z_dim``, ``dim_mult``, ...; ``dec_dim`` for Wan2.2). The
    normalisation constants stay diffusers' defaults (Wan2.1's) unless given (Wan2.2: its 48 values)."""
    from diffusers import AutoencoderKLWan

    kwargs = dict(base_dim=config["dim"], z_dim=config["z_dim"], dim_mult=list(config["dim_mult"]),
                  num_res_blocks=config["num_res_blocks"], temperal_downsample=list(config["temporal_downsample"]))
    if latents_mean is not None:
        kwargs.update(latents_mean=list(latents_mean), latents_std=list(latents_std))
    if "dec_dim" in config:  # Wan2.2: residual stages, 2×2 pixel patches, stride 16
        kwargs.update(decoder_base_dim=config["dec_dim"], is_residual=True, in_channels=12, out_channels=12,
                      patch_size=2, scale_factor_spatial=16)
        state = {vae22_diffusers_key(k): v for k, v in vae.state_dict().items()}
    else:
        state = _vae21_to_diffusers(vae.state_dict(), num_res_blocks=config["num_res_blocks"])
    return _load(AutoencoderKLWan(**kwargs), state, vae)


def transformers_umt5(encoder) -> torch.nn.Module:
    """``transformers.UMT5EncoderModel`` holding ``encoder``'s weights (its embedding tied, as transformers does)."""
    import transformers

    c = encoder.config
    twin = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=c.vocab_size, d_model=c.dim, d_kv=c.dim_attn // c.num_heads, d_ff=c.dim_ffn,
        num_layers=c.num_layers, num_heads=c.num_heads, relative_attention_num_buckets=c.num_buckets,
        relative_attention_max_distance=c.max_distance, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=c.eps, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False))
    state = {official_to_transformers(k): v for k, v in encoder.state_dict().items()}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    if set(missing) - {"encoder.embed_tokens.weight"} or unexpected:
        raise KeyError(f"umT5 twin: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    weight = next(encoder.parameters())
    return twin.to(device=weight.device, dtype=weight.dtype).eval().requires_grad_(False)
