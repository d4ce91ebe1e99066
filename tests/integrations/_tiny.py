"""Tiny diffusers transformers and their inputs (test helpers, importable by spawned ranks).

:data:`CASES` holds one case per diffusers 0.42 transformer class that ships a ``_cp_plan``: a
seeded builder and an ``inputs(size)`` function. ``size=0`` is the USP case, whose split token
count is odd (a remainder on 2 ranks, asserted by the tests); sizes 0-2 are the compile sizes.
Head counts are 2 so Ulysses 2 divides them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

HEADS = 2


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        # diffusers zero-initialises some output layers and gates; random values make every path count
        for p in model.parameters():
            p.data.normal_(0, 0.2)
    return model.eval()


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


# (frames, height, width) in tokens after patching, per size: odd token counts first
GRIDS = [(1, 3, 5), (1, 2, 3), (2, 2, 2)]


def flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    return _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=HEADS, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6)), seed)


def flux_inputs(size: int = 0, text: int = 7, seed: int = 1) -> dict:
    _, h, w = GRIDS[size]
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"), -1)
    return dict(hidden_states=_randn(g, 1, h * w, 8), encoder_hidden_states=_randn(g, 1, text, 24),
                pooled_projections=_randn(g, 1, 12), timestep=torch.tensor([0.6]),
                img_ids=img_ids.reshape(-1, 3).float(), txt_ids=torch.zeros(text, 3), return_dict=False)


def flux2(seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    return _seeded(lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=HEADS, joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False), seed)


def flux2_inputs(size: int = 0, text: int = 7, seed: int = 1) -> dict:
    _, h, w = GRIDS[size]
    g = torch.Generator().manual_seed(seed)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), torch.zeros(1), indexing="ij")
    img_ids = torch.stack(grid, -1).reshape(1, -1, 4)
    txt_ids = torch.stack([torch.zeros(text), torch.zeros(text), torch.zeros(text), torch.arange(text).float()], -1)[None]
    return dict(hidden_states=_randn(g, 1, h * w, 8), encoder_hidden_states=_randn(g, 1, text, 24),
                timestep=torch.tensor([0.6]), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


def qwen(seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    return _seeded(lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=HEADS, joint_attention_dim=24, axes_dims_rope=(4, 6, 6)), seed)


def qwen_inputs(size: int = 0, text: int = 6, seed: int = 1) -> dict:
    """Packed latents: h·w image tokens of 16 channels (2×2 patches of 4 latent channels)."""
    _, h, w = GRIDS[size]
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, 1, h * w, 16), encoder_hidden_states=_randn(g, 1, text, 24),
                timestep=torch.tensor([0.6]), img_shapes=[[(1, h, w)]], return_dict=False)


def wan(seed: int = 0):
    from diffusers import WanTransformer3DModel

    return _seeded(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32), seed)


def wan_inputs(size: int = 0, text: int = 5, seed: int = 1, per_token_t: bool = False) -> dict:
    """Latents (1, 4, f, 2h, 2w): f·h·w tokens after the (1, 2, 2) patch."""
    f, h, w = GRIDS[size]
    g = torch.Generator().manual_seed(seed)
    t = torch.full((1, f * h * w), 700.0) if per_token_t else torch.tensor([700.0])
    return dict(hidden_states=_randn(g, 1, 4, f, 2 * h, 2 * w), timestep=t,
                encoder_hidden_states=_randn(g, 1, text, 16), return_dict=False)


def chronoedit(seed: int = 0):
    """ChronoEdit is Wan 2.1 I2V-shaped: a CLIP image context through extra K/V projections."""
    from diffusers import ChronoEditTransformer3DModel

    return _seeded(lambda: ChronoEditTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, image_dim=8,
        added_kv_proj_dim=HEADS * 12), seed)


def chronoedit_inputs(size: int = 0, seed: int = 1) -> dict:
    # diffusers' I2V processors take the last 512 context tokens as text, the rest as image
    x = wan_inputs(size, text=512, seed=seed)
    x["encoder_hidden_states_image"] = _randn(torch.Generator().manual_seed(seed + 1), 1, 3, 8)
    return x


def helios(seed: int = 0):
    from diffusers import HeliosTransformer3DModel

    return _seeded(lambda: HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4), guidance_cross_attn=True,
        has_multi_term_memory_patch=True, zero_history_timestep=True, is_amplify_history=False), seed)


def helios_inputs(size: int = 0, text: int = 5, seed: int = 1) -> dict:
    """Current latents of ``GRIDS[size]`` plus one short-history frame of 2×2 tokens: the
    self-attention and the feed-forward run over history + current tokens (19 at size 0), the
    cross-attention over the current ones (15)."""
    f, h, w = GRIDS[size]
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, 1, 4, f, 2 * h, 2 * w), timestep=torch.tensor([700]),
                encoder_hidden_states=_randn(g, 1, text, 16),
                indices_hidden_states=torch.arange(1, f + 1)[None],
                indices_latents_history_short=torch.zeros(1, 1, dtype=torch.long),
                latents_history_short=_randn(g, 1, 4, 1, 4, 4), return_dict=False)


def ltx(seed: int = 0):
    from diffusers import LTXVideoTransformer3DModel

    return _seeded(lambda: LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=HEADS, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16), seed)


def _text_mask(text: int, pad: int) -> torch.Tensor:
    """A prompt of ``text`` tokens whose last ``pad`` are padding (masked as keys)."""
    mask = torch.ones(1, text)
    mask[:, text - pad:] = 0
    return mask


def _per_token_timestep(tokens: int) -> torch.Tensor:
    """(1, tokens): the first tokens clean (a conditioning frame), as LTX's image-to-video pipelines pass."""
    t = torch.full((1, tokens), 700.0)
    t[:, : tokens // 3] = 0.0
    return t


def ltx_inputs(size: int = 0, text: int = 7, seed: int = 1) -> dict:
    f, h, w = GRIDS[size]
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, 1, f * h * w, 8), encoder_hidden_states=_randn(g, 1, text, 16),
                timestep=_per_token_timestep(f * h * w), encoder_attention_mask=_text_mask(text, 2),
                num_frames=f, height=h, width=w, return_dict=False)


def ltx2(seed: int = 0):
    from diffusers import LTX2VideoTransformer3DModel

    return _seeded(lambda: LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=HEADS, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=HEADS,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, caption_channels=16,
        rope_double_precision=False), seed)


def ltx2_inputs(size: int = 0, text: int = 7, audio: int = 9, seed: int = 1) -> dict:
    """Video and audio: the plan splits the video tokens (and their per-token timestep), the audio
    stays whole on every rank."""
    f, h, w = GRIDS[size]
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, 1, f * h * w, 4), audio_hidden_states=_randn(g, 1, audio, 4),
                encoder_hidden_states=_randn(g, 1, text, 16), audio_encoder_hidden_states=_randn(g, 1, text, 16),
                timestep=_per_token_timestep(f * h * w), audio_timestep=torch.tensor([700.0]),
                encoder_attention_mask=_text_mask(text, 2),
                audio_encoder_attention_mask=_text_mask(text, 1),
                num_frames=f, height=h, width=w, audio_num_frames=audio, fps=25.0, return_dict=False)


def minimax(seed: int = 0):
    from diffusers import MiniMaxH3Transformer3DModel

    return _seeded(lambda: MiniMaxH3Transformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=1,
        ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8, freq_dim=8,
        time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2), seed)


def minimax_inputs(size: int = 0, text: int = 4, audio: int = 6, seed: int = 1) -> dict:
    """One packed sequence [text, audio, video]: the plan splits all of it; the text's own
    refiner runs before, on the whole text."""
    f, h, w = GRIDS[size]
    video = f * h * w
    g = torch.Generator().manual_seed(seed)
    total = text + audio + video
    text_idx, audio_idx = torch.arange(text), torch.arange(text, text + audio)
    video_idx = torch.arange(text + audio, total)
    tags = torch.zeros(total, dtype=torch.long)
    tags[text_idx], tags[audio_idx] = 1, 2
    t_idx = torch.zeros(total, dtype=torch.long)
    t_idx[audio_idx] = 1
    pos = torch.zeros(total, 3)
    pos[:, 0] = torch.arange(total).float()
    pos[video_idx, 1] = torch.arange(video).float() % h
    pos[video_idx, 2] = torch.arange(video).float() // h
    return dict(hidden_states=_randn(g, 1, video, 16), audio_hidden_states=_randn(g, 1, audio, 6),
                encoder_hidden_states=_randn(g, 1, text, 8), timestep=torch.tensor([0.7, 0.3]),
                timestep_indices=t_idx, token_tags=tags, position_ids=pos, video_indices=video_idx,
                audio_indices=audio_idx, text_indices=text_idx, return_dict=False)


@dataclass(frozen=True)
class Case:
    build: Callable[..., torch.nn.Module]
    inputs: Callable[..., dict]
    blocks: tuple[str, ...]
    """diffusers' ``_repeated_blocks`` of the class (one compiled graph each)."""


CASES: dict[str, Case] = {
    "ChronoEdit": Case(chronoedit, chronoedit_inputs, ("WanTransformerBlock",)),
    "Flux": Case(flux, flux_inputs, ("FluxTransformerBlock", "FluxSingleTransformerBlock")),
    "Flux2": Case(flux2, flux2_inputs, ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")),
    "Helios": Case(helios, helios_inputs, ("HeliosTransformerBlock",)),
    "LTXVideo": Case(ltx, ltx_inputs, ("LTXVideoTransformerBlock",)),
    "LTX2Video": Case(ltx2, ltx2_inputs, ("LTX2VideoTransformerBlock",)),
    "MiniMaxH3": Case(minimax, minimax_inputs, ("MiniMaxH3TransformerBlock", "MiniMaxH3TokenRefinerBlock")),
    "QwenImage": Case(qwen, qwen_inputs, ("QwenImageTransformerBlock",)),
    "Wan": Case(wan, wan_inputs, ("WanTransformerBlock",)),
}
"""The nine diffusers 0.42 transformer classes that ship a ``_cp_plan``."""


def sd3(seed: int = 0, dual: bool = False):
    from diffusers import SD3Transformer2DModel

    return _seeded(lambda: SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=HEADS,
        joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm" if dual else None, dual_attention_layers=(0,) if dual else ()), seed)


def sd3_inputs(size: int = 0, text: int = 7, seed: int = 1) -> dict:
    _, h, w = GRIDS[size]
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, 1, 4, 2 * h, 2 * w), encoder_hidden_states=_randn(g, 1, text, 24),
                pooled_projections=_randn(g, 1, 12), timestep=torch.tensor([500.0]), return_dict=False)


def register_sd3_plan() -> None:
    """What a third party writes to run SD3 (no ``_cp_plan`` in diffusers) sequence-parallel: the image
    tokens split where they enter the first block, gathered after ``proj_out``; SD3's attention is
    ditkit's mirror of ``JointAttnProcessor2_0`` (sites ``joint`` and ``self``)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    from core.integrations.diffusers import register_cp_translation

    register_cp_translation(
        SD3Transformer2DModel, reason="diffusers ships no _cp_plan for SD3",
        plan={"transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
              "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)})


REGISTERED: dict[str, Case] = {"SD3.5 (registered plan)": Case(lambda seed=0: sd3(seed, dual=True), sd3_inputs,
                                                                ("JointTransformerBlock",))}
"""Classes without a shipped plan, run through :func:`register_sd3_plan` (the public registration)."""
