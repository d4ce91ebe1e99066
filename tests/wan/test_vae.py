"""Wan2.1 / Wan2.2 VAE: official key layout, parity with diffusers, causal chunking, tiling.

Parity reference: ``diffusers.AutoencoderKLWan`` (an independent port of the official code,
with other key names).  The tiny VAEs get random weights, the weights are renamed to diffusers'
keys (mapping below, docs/models.md, Wan VAEs) and both run the same fp32 9-frame video / 3-frame
latent.  Tolerance: the two run the same fp32 ops on identically padded tensors, so raw μ and
the decoded video came out bit-identical on CPU (torch 2.13, diffusers 0.42.1); we assert a
max error ≤ 1e-5 relative to the output's max magnitude, which leaves room for other kernels
(conv algorithm choice) and for normalising with ``·(1/std)`` (official) vs ``/std``.

Tiled-decode memory (a measurement, not a test: official-size Wan2.1 VAE with random weights,
a few minutes on CPU), from the repository root::

    OMP_NUM_THREADS=1 /usr/bin/time -v python tests/wan/test_vae.py measure untiled 2 64 64
    OMP_NUM_THREADS=1 /usr/bin/time -v python tests/wan/test_vae.py measure tiled 2 64 64

(arguments: T h w of the latent; tile (16,16), stride (12,12)); numbers in ``WanVAE``'s docstring.
"""
from __future__ import annotations

import hashlib
import re
import sys

import pytest
import torch

from plugins.wan.diffusers_twins import diffusers_vae
from plugins.wan.vae import (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WAN21_VAE_CONFIG,
                             WAN21_VAE_TINY_CONFIG, RMS_norm, WanVAE, tiled_decode)
from plugins.wan.vae22 import (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WAN22_VAE_CONFIG,
                               WAN22_VAE_TINY_CONFIG, Wan22VAE, patchify, unpatchify)
from tests.fingerprints import fingerprint

REL_TOL = 1e-5


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with O(1) activations (γ around 1 so RMS_norm does not kill signal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def vae21() -> WanVAE:
    torch.manual_seed(0)
    return _randomize(WanVAE(**WAN21_VAE_TINY_CONFIG), 1)


@pytest.fixture(scope="module")
def vae22() -> Wan22VAE:
    torch.manual_seed(0)
    return _randomize(Wan22VAE(**WAN22_VAE_TINY_CONFIG), 2)


def _video(f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, f, h, w, generator=g) * 2 - 1


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------- official layout


@pytest.mark.parametrize("cls,config,n,params,fp", [
    (WanVAE, WAN21_VAE_CONFIG, 194, 126_892_531, "ccc42284ea13e1ad04693284c7a09be6"),
    (Wan22VAE, WAN22_VAE_CONFIG, 196, 704_688_668, "e1de6c02cdac79f8b739f4d3698cd216"),
], ids=["wan2.1", "wan2.2"])
def test_official_key_layout(cls, config, n, params, fp):
    """The real-size module's state_dict has the published file's fingerprint (Appendix B)."""
    with torch.device("meta"):
        model = cls(**config)
    sd = model.state_dict()
    assert len(sd) == n
    assert sum(t.numel() for t in sd.values()) == params
    assert fingerprint(sd) == fp


@pytest.mark.parametrize("which", ["wan2.1", "wan2.2"])
def test_pth_round_trip(which, vae21, vae22, tmp_path):
    """A .pth in the official layout loads with torch.load(mmap, weights_only) + strict=True."""
    src, cls, cfg = ((vae21, WanVAE, WAN21_VAE_TINY_CONFIG) if which == "wan2.1"
                     else (vae22, Wan22VAE, WAN22_VAE_TINY_CONFIG))
    path = tmp_path / "vae.pth"
    torch.save(src.state_dict(), path)
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    dst = cls(**cfg).eval()
    dst.load_state_dict(sd, strict=True)
    z = torch.randn(1, dst.z_dim, 2, 2, 2)
    with torch.no_grad():
        assert torch.equal(dst.decode(z), src.decode(z))


# ---------------------------------------------------------------------------- diffusers parity


def _diffusers_twin(model: WanVAE, v22: bool):
    """diffusers' AutoencoderKLWan with ``model``'s weights, official names mapped (docs/models.md, Wan
    VAEs; ``plugins.wan.diffusers_twins``), loaded strict=True."""
    if v22:
        return diffusers_vae(model, WAN22_VAE_TINY_CONFIG, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)
    return diffusers_vae(model, WAN21_VAE_TINY_CONFIG)


@pytest.mark.parametrize("which", ["wan2.1", "wan2.2"])
def test_matches_diffusers(which, vae21, vae22):
    """encode (incl. normalisation) and decode equal diffusers' AutoencoderKLWan on 9 frames."""
    v22 = which == "wan2.2"
    ours = vae22 if v22 else vae21
    ref = _diffusers_twin(ours, v22)
    mean = torch.tensor(WAN22_LATENTS_MEAN if v22 else WAN21_LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN22_LATENTS_STD if v22 else WAN21_LATENTS_STD).view(1, -1, 1, 1, 1)
    video = _video(9, 64, 64) if v22 else _video(9, 32, 48)
    with torch.no_grad():
        mu_ref = ref.encode(video).latent_dist.mode()
        z = ours.encode(video)
        assert z.shape == mu_ref.shape == (1, ours.z_dim, 3, *[s // ours.spatial_stride for s in video.shape[3:]])
        assert _rel_err(z, (mu_ref - mean) / std) <= REL_TOL
        assert _rel_err(ours.encode(video, normalize=False), mu_ref) <= REL_TOL

        lat = torch.randn(1, ours.z_dim, 3, *z.shape[3:], generator=torch.Generator().manual_seed(3))
        out_ref = ref.decode(lat * std + mean).sample
        out = ours.decode(lat)
        assert out.shape == out_ref.shape == (1, 3, 9, *video.shape[3:])
        assert 0.05 < out.abs().mean() and out.abs().max() <= 1.0  # not degenerate
        assert _rel_err(out, out_ref) <= REL_TOL
        assert _rel_err(ours.decode(lat * std + mean, normalized=False), out_ref) <= REL_TOL


# ---------------------------------------------------------------------------- temporal rules


@pytest.mark.parametrize("T", [1, 2, 4])
def test_decode_frame_count(vae21, T):
    """T latent frames decode to 1 + 4(T-1) frames; encoding them gives T latents back."""
    with torch.no_grad():
        video = vae21.decode(torch.randn(1, 16, T, 2, 3))
        assert video.shape == (1, 3, 1 + 4 * (T - 1), 16, 24)
        assert vae21.encode(video).shape == (1, 16, T, 2, 3)


def test_causal(vae21, vae22):
    """Latent t depends only on frames ≤ 4t (frame 0 alone for t = 0); decoded frames of the
    first latents do not change when later latents do."""
    with torch.no_grad():
        for vae, hw in ((vae21, (16, 16)), (vae22, (32, 32))):
            a = _video(9, *hw, seed=1)
            b = a.clone()
            b[:, :, 5:] = _video(4, *hw, seed=2)
            za, zb = vae.encode(a), vae.encode(b)
            assert torch.equal(za[:, :, :2], zb[:, :, :2]) and not torch.allclose(za[:, :, 2], zb[:, :, 2])
            b[:, :, 1:] = 0
            # frame 0 alone (the 1³ conv1 then runs on 1 frame instead of 3: rounding only)
            torch.testing.assert_close(vae.encode(a[:, :, :1]), vae.encode(b)[:, :, :1], rtol=1e-6, atol=1e-6)

            la = torch.randn(1, vae.z_dim, 3, 2, 2)
            lb = la.clone()
            lb[:, :, 2] += 1
            va, vb = vae.decode(la), vae.decode(lb)
            assert torch.equal(va[:, :, :5], vb[:, :, :5]) and not torch.equal(va[:, :, 5:], vb[:, :, 5:])


def test_rms_norm_is_l2_normalize():
    """RMS_norm = x / max(‖x‖₂ over channels, 1e-12) · √C · γ (docs/models.md, Wan VAEs): exactly scale
    invariant down to tiny inputs, unlike an RMSNorm with eps 1e-6 inside the mean square."""
    norm = RMS_norm(6, images=False)
    with torch.no_grad():
        norm.gamma.copy_(torch.linspace(0.5, 1.5, 6).view(6, 1, 1, 1))
    x = torch.randn(2, 6, 3, 4, 5)
    x[0, :, 0, 0, 0] = 0
    expected = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * 6 ** 0.5 * norm.gamma
    torch.testing.assert_close(norm(x), expected)
    assert norm(x)[0, :, 0, 0, 0].abs().max() == 0
    small = 1e-4 * x
    torch.testing.assert_close(norm(small), norm(x))
    rms_eps = small / (small.pow(2).mean(1, keepdim=True) + 1e-6).sqrt() * norm.gamma
    assert (rms_eps - norm(small)).abs().max() > 0.5


def test_normalisation_constants(vae21, vae22):
    """encode/decode normalise with Appendix A's constants: z = (μ - mean) / std."""
    for vae, mean, std in ((vae21, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD),
                           (vae22, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)):
        mu = torch.randn(1, vae.z_dim, 2, 3, 3)
        m, s = torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(vae.normalize_latents(mu), (mu - m) / s)
        torch.testing.assert_close(vae.denormalize_latents(vae.normalize_latents(mu)), mu)
    assert WAN21_LATENTS_MEAN[0] == -0.7571 and WAN21_LATENTS_STD[-1] == 1.9160
    assert WAN22_LATENTS_MEAN[-1] == -0.0667 and WAN22_LATENTS_STD[0] == 0.4765


def test_patchify_order():
    """Wan2.2 patch channel = c·4 + r·2 + q, r the width offset, q the height offset."""
    x = torch.arange(3 * 1 * 4 * 4, dtype=torch.float32).view(1, 3, 1, 4, 4)
    p = patchify(x)
    c, r, q, i, j = 2, 1, 0, 1, 0  # pixel (h = 2i + q, w = 2j + r)
    assert p[0, c * 4 + r * 2 + q, 0, i, j] == x[0, c, 0, 2 * i + q, 2 * j + r]
    assert torch.equal(unpatchify(p), x)


# ---------------------------------------------------------------------------- tiled decode

def test_tile_blending_is_a_partition_of_unity():
    """With a purely local "decoder" the blended tiles reproduce the untiled output exactly,
    for uneven tilings too (the last tile is shifted back to the border)."""
    z = torch.randn(1, 2, 2, 11, 13)
    local = lambda t: torch.repeat_interleave(torch.repeat_interleave(torch.tanh(t), 8, -2), 8, -1)
    for tile, stride in (((4, 4), (2, 3)), ((6, 5), (5, 4)), ((11, 13), (11, 13)), ((3, 20), (1, 1))):
        torch.testing.assert_close(tiled_decode(local, z, tile, stride, 8), local(z), rtol=1e-6, atol=1e-6)


# Measured with these fixtures (random tiny weights, latents 16×16, tile 12, stride 4):
# max |tiled - untiled| over the whole video (values in [-1,1]) and the mean.  Random weights
# make the decoder's receptive field (>10 latents) and the per-frame attention of the middle
# block fully non-local, so this is a loose regression bound, not a quality figure.
TILE_ERR = {"wan2.1": (0.352, 0.0276), "wan2.2": (0.553, 0.0402)}


@pytest.mark.parametrize("which", ["wan2.1", "wan2.2"])
def test_tiled_decode(which, vae21, vae22):
    vae = vae22 if which == "wan2.2" else vae21
    lat = torch.randn(1, vae.z_dim, 2, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # one tile covering everything is the untiled decode
        small = lat[:, :, :, :3, :4]
        assert torch.equal(vae.decode(small, tiled=True, tile=(3, 4), stride=(3, 4)), vae.decode(small))
        full = vae.decode(lat)
        tiled = vae.decode(lat, tiled=True, tile=(12, 12), stride=(4, 4))
    assert tiled.shape == full.shape
    diff = (tiled - full).abs()
    print(f"{which}: tiled vs untiled max abs {diff.max():.4f}, mean abs {diff.mean():.5f}")
    max_abs, mean_abs = TILE_ERR[which]
    assert diff.max() <= max_abs * 1.01 and diff.mean() <= mean_abs * 1.01


# ---------------------------------------------------------------------------- memory (manual)


def measure_decode_rss(tiled: bool, T: int = 3, h: int = 48, w: int = 48) -> None:
    """Print peak RSS of one official-size Wan2.1 decode (random weights) in this process."""
    import resource
    import time
    torch.manual_seed(0)
    vae = WanVAE(**WAN21_VAE_CONFIG).eval()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    with torch.no_grad():
        out = vae.decode(torch.randn(1, 16, T, h, w), tiled=tiled, tile=(16, 16), stride=(12, 12))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"tiled={tiled} out={tuple(out.shape)} rss_after_build={base / 2**20:.2f} GiB "
          f"peak_rss={peak / 2**20:.2f} GiB time={time.time() - t0:.1f}s")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "measure":
    # python tests/wan/test_vae.py measure {tiled|untiled} [T h w]
    measure_decode_rss(sys.argv[2] == "tiled", *map(int, sys.argv[3:6]))
