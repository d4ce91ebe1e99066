"""Qwen-Image DiT: official key layout and parity with diffusers' QwenImageTransformer2DModel.

Reference: ``diffusers.QwenImageTransformer2DModel`` (0.42.1) at the tiny config, one seeded
random state dict loaded into both with ``strict=True`` (same key names, no conversion), fp32 on
CPU. diffusers takes a *batch* of two prompts of different lengths, right-padded with a 0/1
mask; ours runs each prompt alone at its real length (how the pipeline runs the CFG branches),
so the test also shows that the padded text keys diffusers masks never matter here.
"""
from __future__ import annotations


import pytest
import torch

from plugins.qwen_image.dit import (QwenImageDiTConfig, QwenImageTransformer, pack_latents, timestep_features,
                                    unpack_latents)

import diffusers  # noqa: E402  (the test extra: the parity reference)
from tests.fingerprints import fingerprint

REL_TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def seeded_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A random state dict with O(1) activations (norm weights near 1, fan-in scaled matrices)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        if t.dim() == 1 and "norm" in name:
            out[name] = 1 + 0.2 * torch.randn(t.shape, generator=g)
        elif t.dim() == 1:
            out[name] = 0.1 * torch.randn(t.shape, generator=g)
        else:
            out[name] = torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5
    return out


@pytest.fixture(scope="module")
def pair():
    cfg = QwenImageDiTConfig.tiny()
    ours = QwenImageTransformer(cfg).eval()
    ref = diffusers.QwenImageTransformer2DModel(
        patch_size=cfg.patch_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
        axes_dims_rope=cfg.axes_dims_rope).eval()
    sd = seeded_state(ref, 0)
    ref.load_state_dict(sd, strict=True)
    ours.load_state_dict(sd, strict=True)
    return ours, ref


def test_official_key_set_on_meta():
    """The released config, built on the meta device, has the published transformer/ key set."""
    with torch.device("meta"):
        model = QwenImageTransformer(QwenImageDiTConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 1933
    assert sum(v.numel() for v in model.state_dict().values()) == 20_430_401_088
    assert fingerprint(shapes) == "0319a1cb19835fb510907dd3367c95ff"


def test_packing_is_channel_slowest():
    x = torch.arange(16 * 4 * 6, dtype=torch.float32).reshape(1, 16, 4, 6)
    tokens = pack_latents(x)
    assert tokens.shape == (1, 6, 64)
    # token 0 = patch rows 0..1, cols 0..1; feature c·4 + ph·2 + pw
    assert tokens[0, 0, 1 * 4 + 1 * 2 + 0] == x[0, 1, 1, 0]
    assert torch.equal(unpack_latents(tokens, 4, 6), x)


def test_timestep_features_match_diffusers():
    from diffusers.models.embeddings import Timesteps

    sigma = torch.tensor([1.0, 0.63, 0.02])
    ref = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)(sigma)
    assert torch.equal(timestep_features(sigma), ref)


@pytest.mark.parametrize("h,w", [(6, 10), (10, 6), (6, 6)], ids=["3x5-odd-tokens", "5x3-tall", "3x3-odd-square"])
def test_matches_diffusers_two_prompts_of_different_lengths(pair, h, w):
    """Latent h×w (token grid h/2 × w/2: 15 and 9 tokens, odd; non-square) with two prompts of 7 and
    4 tokens: diffusers batched with a mask equals ours per prompt, rel err ≤ 1e-5."""
    ours, ref = pair
    cfg = ours.config
    g = torch.Generator().manual_seed(1)
    lens = (7, 4)
    latents = torch.randn(2, 16, h, w, generator=g)
    text = torch.randn(2, max(lens), cfg.joint_attention_dim, generator=g)
    mask = torch.zeros(2, max(lens), dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
        text[i, n:] = 0  # the pipeline's zero padding
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        want = ref(hidden_states=pack_latents(latents), encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                   timestep=sigma, img_shapes=[(1, h // 2, w // 2)] * 2, return_dict=False)[0]
        want = unpack_latents(want, h, w)
        for i, n in enumerate(lens):
            got = ours(latents[i:i + 1], sigma[i:i + 1], text[i:i + 1, :n])
            assert got.shape == (1, 16, h, w)
            assert _rel(got, want[i:i + 1]) <= REL_TOL, (i, _rel(got, want[i:i + 1]))
        # the text really matters: another prompt changes the output
        other = ours(latents[:1], sigma[:1], text[1:2, :lens[1]])
        assert _rel(other, want[:1]) > 1e-3


def test_from_json_refuses_variants():
    data = {**QwenImageDiTConfig().to_dict(), "_class_name": "QwenImageTransformer2DModel", "use_layer3d_rope": True}
    with pytest.raises(ValueError, match="use_layer3d_rope"):
        QwenImageDiTConfig.from_json_dict(data)
    data["use_layer3d_rope"] = False
    assert QwenImageDiTConfig.from_json_dict(data) == QwenImageDiTConfig()
