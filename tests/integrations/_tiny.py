"""Tiny diffusers transformers and their inputs (test helpers, importable by spawned ranks).

Head counts are 4 so Ulysses 2 and 4 both divide them; each ``inputs`` function takes the image
grid so a test can pick token counts that leave a remainder on 2 and 4 ranks.
"""
from __future__ import annotations

import torch

HEADS = 4


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        # diffusers zero-initialises some output layers; random values make every path count
        for p in model.parameters():
            p.data.normal_(0, 0.2)
    return model.eval()


def flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    return _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=HEADS, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6)), seed)


def flux_inputs(h: int, w: int, text: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"), -1)
    return dict(hidden_states=torch.randn(1, h * w, 8, generator=g),
                encoder_hidden_states=torch.randn(1, text, 24, generator=g),
                pooled_projections=torch.randn(1, 12, generator=g), timestep=torch.tensor([0.6]),
                img_ids=img_ids.reshape(-1, 3).float(), txt_ids=torch.zeros(text, 3), return_dict=False)


def wan(seed: int = 0):
    from diffusers import WanTransformer3DModel

    return _seeded(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32), seed)


def wan_i2v(seed: int = 0):
    """Wan 2.1 I2V: the image context (CLIP tokens) goes through extra K/V projections."""
    from diffusers import WanTransformer3DModel

    return _seeded(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32, image_dim=8,
        added_kv_proj_dim=HEADS * 12), seed)


def wan_i2v_inputs(f: int, h: int, w: int, seed: int = 1) -> dict:
    # diffusers' Wan I2V processor takes the last 512 context tokens as text, the rest as image
    x = wan_inputs(f, h, w, text=512, seed=seed)
    x["encoder_hidden_states_image"] = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(seed + 1))
    return x


def wan_inputs(f: int, h: int, w: int, text: int = 5, seed: int = 1, per_token_t: bool = False) -> dict:
    """Latents (1, 4, f, 2h, 2w): f·h·w tokens after the (1, 2, 2) patch."""
    g = torch.Generator().manual_seed(seed)
    t = torch.full((1, f * h * w), 700.0) if per_token_t else torch.tensor([700.0])
    return dict(hidden_states=torch.randn(1, 4, f, 2 * h, 2 * w, generator=g), timestep=t,
                encoder_hidden_states=torch.randn(1, text, 16, generator=g), return_dict=False)


def qwen(seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    return _seeded(lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=HEADS, joint_attention_dim=24, axes_dims_rope=(4, 6, 6)), seed)


def qwen_inputs(h: int, w: int, text: int = 6, seed: int = 1) -> dict:
    """Packed latents: h·w image tokens of 16 channels (2×2 patches of 4 latent channels)."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, h * w, 16, generator=g),
                encoder_hidden_states=torch.randn(1, text, 24, generator=g),
                timestep=torch.tensor([0.6]), img_shapes=[[(1, h, w)]], return_dict=False)


def sd3(seed: int = 0, dual: bool = False):
    from diffusers import SD3Transformer2DModel

    return _seeded(lambda: SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=HEADS,
        joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm" if dual else None, dual_attention_layers=(0,) if dual else ()), seed)


def sd3_inputs(h: int, w: int, text: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, 2 * h, 2 * w, generator=g),
                encoder_hidden_states=torch.randn(1, text, 24, generator=g),
                pooled_projections=torch.randn(1, 12, generator=g), timestep=torch.tensor([500.0]), return_dict=False)
