"""Parity of MOVA's new components with independent implementations of the official architecture.

One seeded random state dict per component (every tensor of the init perturbed with seeded
noise), loaded ``strict=True`` into both sides (so the key sets agree too), fp32, relative error
``‖ours − ref‖ / ‖ref‖ ≤ 1e-5``:

* audio tower vs DiffSynth's ``MovaAudioDit`` (run as DiffSynth's pipeline runs it);
* bridge vs DiffSynth's ``DualTowerConditionalBridge`` (its own aligned tables), both layers,
  with and without the first-frame bias;
* the whole dual-tower pass vs DiffSynth's own ``model_fn_mova_audio_video`` (its source, run with
  DiffSynth's towers and bridge);
* DAC encode/decode vs DiffSynth's ``DacVAE``; the encoder/decoder blocks vs Descript's
  ``descript-audio-codec`` (weight norm removed, i.e. fused, as the release stores it).

The references are test-only (see :mod:`tests.mova.refs`); a missing one fails these tests.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils import remove_weight_norm

from plugins.mova.audio_dit import AudioDiTConfig, WanAudioModel
from plugins.mova.bridge import BridgeConfig, DualTowerConditionalBridge
from plugins.mova.dac import AudioDAC, DACConfig
from plugins.mova.model import MovaVideoDiT, dual_tower_forward
from plugins.wan.dit import WanDiTConfig

from plugins.mova.reference import diffsynth_model_fn

from . import refs

RTOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The module's init plus seeded noise on every tensor (norm weights and Snake α stay near 1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}
    module.load_state_dict(sd)
    return sd


@pytest.fixture(scope="module")
def ds():
    # (DiffSynth's torch.compile'd rotate-half helper is unwrapped by the importer: same math, no compile)
    audio_mod, bridge_mod, vae_mod, wan_mod = refs.diffsynth()
    return types_ns(audio=audio_mod, bridge=bridge_mod, vae=vae_mod, wan=wan_mod)


class types_ns(dict):
    __getattr__ = dict.__getitem__


def ds_audio_dit(ds, c: AudioDiTConfig):
    return ds.audio.MovaAudioDit(dim=c.dim, in_dim=c.in_dim, ffn_dim=c.ffn_dim, out_dim=c.out_dim, text_dim=c.text_dim,
                                 freq_dim=c.freq_dim, eps=c.eps, patch_size=[1], num_heads=c.num_heads,
                                 num_layers=c.num_layers, has_image_input=False).eval()


def ds_video_dit(ds, c: WanDiTConfig):
    return ds.wan.WanModel(dim=c.dim, in_dim=c.in_dim, ffn_dim=c.ffn_dim, out_dim=c.out_dim, text_dim=c.text_dim,
                           freq_dim=c.freq_dim, eps=c.eps, patch_size=c.patch_size, num_heads=c.num_heads,
                           num_layers=c.num_layers, has_image_input=False).eval()


def ds_bridge(ds, c: BridgeConfig):
    return ds.bridge.DualTowerConditionalBridge(
        visual_layers=c.visual_layers, audio_layers=c.audio_layers, visual_hidden_dim=c.visual_hidden_dim,
        audio_hidden_dim=c.audio_hidden_dim, audio_fps=c.audio_fps, head_dim=c.head_dim,
        interaction_strategy=c.interaction_strategy, apply_cross_rope=c.apply_cross_rope,
        apply_first_frame_bias_in_rope=c.apply_first_frame_bias_in_rope).eval()


def ds_audio_forward(ds, ref, x, t, context):
    """DiffSynth's audio tower as its pipeline runs it (``MovaAudioDit.forward`` itself is stale)."""
    from einops import rearrange

    e = ref.time_embedding(ds.wan.sinusoidal_embedding_1d(ref.freq_dim, t))
    t_mod = ref.time_projection(e).unflatten(1, (6, ref.dim))
    ctx = ref.text_embedding(context)
    x = rearrange(ref.patch_embedding(x), "b c f -> b f c")
    f = x.shape[1]
    freqs = torch.cat([ref.freqs[i][:f].view(f, -1) for i in range(3)], dim=-1).reshape(f, 1, -1)
    for block in ref.blocks:
        x = block(x, ctx, t_mod, freqs)
    return ref.unpatchify(ref.head(x, e), (f,))


TINY_AUDIO = AudioDiTConfig.tiny()
TINY_VIDEO = WanDiTConfig.tiny("i2v", dim=128, ffn_dim=256, num_heads=4, num_layers=3)
TINY_BRIDGE = BridgeConfig.tiny()


def test_audio_dit_matches_diffsynth(ds):
    ours = WanAudioModel(TINY_AUDIO).eval()
    ref = ds_audio_dit(ds, TINY_AUDIO)
    ref.load_state_dict(randomize(ours, 1), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, 19, generator=g)
    ctx = torch.randn(1, 24, TINY_AUDIO.text_dim, generator=g)
    t = torch.tensor([873.5])
    with torch.no_grad():
        err = rel(ours(x, t, ctx), ds_audio_forward(ds, ref, x, t, ctx))
    assert err <= RTOL, err


@pytest.mark.parametrize("first_frame_bias", [False, True])
def test_bridge_matches_diffsynth(ds, first_frame_bias):
    cfg = BridgeConfig.tiny(apply_first_frame_bias_in_rope=first_frame_bias)
    ours = DualTowerConditionalBridge(cfg).eval()
    ref = ds_bridge(ds, cfg)
    ref.load_state_dict(randomize(ours, 2), strict=True)
    g = torch.Generator().manual_seed(0)
    grid, la, fps = (3, 2, 2), 19, 24.0
    video = torch.randn(1, 12, cfg.visual_hidden_dim, generator=g)
    audio = torch.randn(1, la, cfg.audio_hidden_dim, generator=g)
    v_freqs, a_freqs = ref.build_aligned_freqs(video_fps=fps, grid_size=grid, audio_steps=la, dtype=torch.float32)
    with torch.no_grad():
        for layer in cfg.layers:
            v_ref, a_ref = ref(layer, video, audio, x_freqs=v_freqs, y_freqs=a_freqs, condition_scale=1.0, video_grid_size=grid)
            v_ours, a_ours = ours(layer, video, audio, grid=grid, audio_length=la, video_fps=fps)
            # compare the bridge's contribution, not the residual it is added to
            assert rel(v_ours - video, v_ref - video) <= RTOL
            assert rel(a_ours - audio, a_ref - audio) <= RTOL


def test_dual_tower_pass_matches_diffsynth_model_fn(ds):
    """Layer order, pre-update streams, aligned positions, video layers past the shared ones, heads."""
    video, audio, bridge = MovaVideoDiT(TINY_VIDEO).eval(), WanAudioModel(TINY_AUDIO).eval(), DualTowerConditionalBridge(TINY_BRIDGE).eval()
    r_video, r_audio, r_bridge = ds_video_dit(ds, TINY_VIDEO), ds_audio_dit(ds, TINY_AUDIO), ds_bridge(ds, TINY_BRIDGE)
    r_video.load_state_dict(randomize(video, 3), strict=True)
    r_audio.load_state_dict(randomize(audio, 4), strict=True)
    r_bridge.load_state_dict(randomize(bridge, 5), strict=True)
    g = torch.Generator().manual_seed(0)
    xv = torch.randn(1, 16, 3, 4, 6, generator=g)  # 3 latent frames of 2×3 tokens
    y = torch.randn(1, 20, 3, 4, 6, generator=g)
    xa = torch.randn(1, 128, 19, generator=g)
    ctx = torch.randn(1, 24, 32, generator=g)
    t = torch.tensor([950.0])
    with torch.no_grad():
        ref_v, ref_a = diffsynth_model_fn(ds)(r_video, r_audio, r_bridge, video_latents=xv, audio_latents=xa, timestep=t,
                                      context=ctx, y=y, frame_rate=24)
        got_v, got_a = dual_tower_forward(video, audio, bridge, xv, xa, t, ctx, y, 24.0)
    assert got_v.shape == ref_v.shape and got_a.shape == ref_a.shape
    assert rel(got_v, ref_v) <= RTOL and rel(got_a, ref_a) <= RTOL


TINY_DAC = DACConfig.tiny()


def test_dac_matches_diffsynth(ds):
    c = TINY_DAC
    ours = AudioDAC(c).eval()
    ref = ds.vae.DacVAE(encoder_dim=c.encoder_dim, encoder_rates=list(c.encoder_rates), latent_dim=c.latent_dim,
                        decoder_dim=c.decoder_dim, decoder_rates=list(c.decoder_rates), sample_rate=c.sample_rate,
                        continuous=True, use_weight_norm=False).eval()
    ref.load_state_dict(randomize(ours, 6), strict=True)
    g = torch.Generator().manual_seed(0)
    audio = torch.rand(1, 1, 4321, generator=g) * 2 - 1  # not a multiple of the hop: padded
    with torch.no_grad():
        z_ref = ref.encode(ref.preprocess(audio, c.sample_rate))[0].mode()
        z = ours.encode(audio)
        assert z.shape == (1, 128, 5)
        assert rel(z, z_ref) <= RTOL
        assert ours.decode(z_ref).shape[-1] == 960 * 5  # exactly hop · L samples before trimming
        wave = ours.decode(z_ref, 4321)
        wave_ref = ref.decode(z_ref)
        assert wave_ref.shape[-1] == 960 * 5 and wave.shape == (1, 1, 4321)
        assert rel(wave, wave_ref[..., :4321]) <= RTOL


def test_dac_blocks_match_descript():
    """Encoder at the release rates; decoder at even rates: Descript's transposed convolutions have
    no ``output_padding``, which MOVA adds for its odd strides 5 and 3 (covered against DiffSynth)."""
    dac = refs.descript_dac()
    c = TINY_DAC
    ours = AudioDAC(c).eval()
    even = AudioDAC(DACConfig.tiny(encoder_rates=(2, 4, 8), decoder_rates=(8, 4, 2))).eval()
    randomize(ours, 7)
    randomize(even, 8)
    enc = dac.Encoder(c.encoder_dim, list(c.encoder_rates), c.latent_dim)
    dec = dac.Decoder(c.latent_dim, c.decoder_dim, [8, 4, 2])
    for m in (*enc.modules(), *dec.modules()):
        if hasattr(m, "weight_g"):
            remove_weight_norm(m)  # the release stores fused weights
    enc.load_state_dict(ours.encoder.state_dict(), strict=True)
    dec.load_state_dict(even.decoder.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    audio = torch.rand(1, 1, 1920, generator=g) * 2 - 1
    z = torch.randn(1, 128, 3, generator=g)
    with torch.no_grad():
        assert rel(ours.encoder(audio), enc(audio)) <= RTOL
        assert rel(even.decoder(z), dec(z)) <= RTOL
