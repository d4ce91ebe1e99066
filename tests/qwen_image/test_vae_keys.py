"""The diffusers ↔ Wan VAE key map (plugins/wan/diffusers_vae_keys.py).

A diffusers-layout VAE file (Qwen-Image ``vae/``, MOVA ``video_vae/``) must load into the Wan
plugin's ``WanVAE`` through ``WeightFile.key_map`` and then compute what diffusers computes.
Parity reference: ``diffusers.AutoencoderKLWan`` and ``AutoencoderKLQwenImage`` at a tiny width,
seeded random weights written as a diffusers safetensors file, loaded through the real loader
(``core.weights.load_component``), fp32; relative error ≤ 1e-5 (on CPU it is bit-identical).
"""
from __future__ import annotations

import doctest

import pytest
import torch

from core.spec import WeightFile
from core.weights import check_layout, load_component
from plugins.wan import diffusers_vae_keys
from plugins.wan.diffusers_vae_keys import diffusers_key, official_key, to_diffusers, to_official
from plugins.wan.vae import WAN21_VAE_CONFIG, WanVAE

import diffusers  # noqa: E402  (the test extra: the parity reference)
from tests.fingerprints import fingerprint

REL_TOL = 1e-5
TINY = dict(dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, temporal_downsample=(False, True, True))


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with O(1) activations (γ near 1, fan-in scaled kernels)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return module.eval()


def _reference(cls_name: str):
    cls = getattr(diffusers, cls_name)
    return cls(base_dim=TINY["dim"], z_dim=16, dim_mult=list(TINY["dim_mult"]), num_res_blocks=2,
               temperal_downsample=list(TINY["temporal_downsample"]))


def test_real_config_maps_onto_official_key_set():
    """Every real-size diffusers key maps to a WanVAE key with the same shape, and back."""
    with torch.device("meta"):
        ours, ref = WanVAE(**WAN21_VAE_CONFIG), diffusers.AutoencoderKLQwenImage()
    ref_shapes, our_shapes = _shapes(ref), _shapes(ours)
    assert len(ref_shapes) == 194
    # the published Qwen-Image vae/ (= diffusers AutoencoderKLWan default) key set
    assert fingerprint(ref_shapes) == "ed4ea5824d55ec3107b09815e318123a"
    assert to_official(ref_shapes) == our_shapes
    assert to_diffusers(our_shapes) == ref_shapes
    assert all(official_key(diffusers_key(k)) == k for k in our_shapes)


def test_unknown_keys_pass_through():
    for key in ("lm_head.weight", "encoder.something.weight", "decoder.up_blocks.0.attn.weight", "conv1.gamma"):
        assert official_key(key) == key
        assert diffusers_key(key) == key


def test_docstring_examples():
    assert doctest.testmod(diffusers_vae_keys).failed == 0


@pytest.mark.parametrize("cls_name", ["AutoencoderKLWan", "AutoencoderKLQwenImage"])
def test_loads_through_key_map_and_matches_diffusers(cls_name, tmp_path):
    """A diffusers safetensors file → WanVAE via the declared key map; encode μ and decode agree
    with diffusers for a single image (the Qwen-Image path) and a 5-frame video."""
    from safetensors.torch import save_file

    ref = _seeded(_reference(cls_name), seed=7)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    ours = WanVAE(**TINY).eval()
    wf = WeightFile(component="vae", path="vae.safetensors", key_map="plugins.wan.diffusers_vae_keys:official_key")
    assert load_component(tmp_path, wf, ours)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for frames, h, w in ((1, 32, 48), (5, 16, 16)):
            x = torch.rand(1, 3, frames, h, w, generator=g) * 2 - 1
            mu_ref = ref.encode(x).latent_dist.mode()
            mu = ours.encode(x, normalize=False)
            assert mu.shape == mu_ref.shape
            assert ((mu - mu_ref).abs().max() / mu_ref.abs().max()).item() <= REL_TOL
            out_ref = ref.decode(mu_ref).sample
            out = ours.decode(mu_ref, normalized=False)
            assert out.shape == out_ref.shape == x.shape
            assert out.abs().mean() > 0.05  # not a degenerate (saturated or zero) output
            assert ((out - out_ref).abs().max() / out_ref.abs().max()).item() <= REL_TOL


def test_wrong_map_is_refused(tmp_path):
    """Without the key map the diffusers file does not fit WanVAE: the loader names keys."""
    from core.errors import WeightsError
    from safetensors.torch import save_file

    ref = _reference("AutoencoderKLWan")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(WeightsError, match="unexpected keys.*decoder.conv_in"):
        check_layout(tmp_path, WeightFile(component="vae", path="vae.safetensors"), WanVAE(**TINY))
