"""Wan DiT: official key layout (fingerprints), and parity with diffusers' independent implementation.

Parity tolerance: both models run in float32 on the CPU with the same SDPA kernel; they differ only
in the order of a few float32 operations (norm formulas, where the modulation is added), so
outputs agree to float32 rounding. We assert max|ours - theirs| <= 1e-5 · max|theirs|.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plugins.wan.diffusers_twins import diffusers_transformer
from plugins.wan.dit import (
    WAN_DIT_CONFIGS,
    WanDiTConfig,
    WanModel,
    WanRotary,
    apply_rope,
    rope_axis_dims,
    sinusoidal_features,
)

import diffusers  # noqa: E402  (the test extra: the parity reference)
from tests.fingerprints import fingerprint

REL_TOL = 1e-5

# docs/models.md (fingerprints) (tensors, params in billions to 3 decimals, fingerprint).
OFFICIAL = {
    "wan2.1-t2v-1.3b": (825, 1.419, "9269f8db9040a9d860eaca435be61814"),
    "wan2.1-t2v-14b": (1095, 14.288, "aafcfd9672c3a2456dc46e1cb6e52c70"),
    "wan2.2-t2v-a14b": (1095, 14.288, "aafcfd9672c3a2456dc46e1cb6e52c70"),
    "wan2.2-i2v-a14b": (1095, 14.289, "5b013604280dd715f8457c6ed6d6a626"),
    "wan2.2-ti2v-5b": (825, 5.000, "1f5ab7703c6fc803fdded85ff040c316"),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_key_layout(name):
    with torch.device("meta"):
        model = WanModel(WAN_DIT_CONFIGS[name])
    sd = model.state_dict()
    tensors, params_b, fp = OFFICIAL[name]
    assert len(sd) == tensors
    assert round(sum(v.numel() for v in sd.values()) / 1e9, 3) == params_b
    assert fingerprint(sd) == fp


def test_config_from_official_json():
    cfg = WanDiTConfig.from_json_dict({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "ti2v", "dim": 3072,
        "ffn_dim": 14336, "freq_dim": 256, "in_dim": 48, "out_dim": 48, "num_heads": 24, "num_layers": 30,
        "eps": 1e-6, "text_len": 512, "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True,
    })
    assert cfg == WAN_DIT_CONFIGS["wan2.2-ti2v-5b"]
    assert WanModel._repeated_blocks == ("WanAttentionBlock",)
    with torch.device("meta"):
        assert type(WanModel(cfg).blocks[0]).__name__ in WanModel._repeated_blocks


def test_rope_split_and_interleaved_convention():
    assert rope_axis_dims(128) == (44, 42, 42)
    # Interleaved pairs (docs/models.md, rotary embeddings) equal the complex product (x_2j + i x_2j+1)·e^{iθ_j}.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g)
    theta = torch.randn(1, 5, 1, 4, generator=g, dtype=torch.float64)
    rope = torch.stack([theta.cos(), theta.sin()], -1).float()
    ref = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * torch.polar(torch.ones_like(theta), theta))
    torch.testing.assert_close(apply_rope(x, rope), ref.flatten(-2).float(), rtol=1e-6, atol=1e-6)


def test_rope_table_equals_official_complex128_table_up_to_position_1023():
    """Angles reach ~1023 rad: the table must come from float64 angles (official complex128 tables)."""
    def official(n, dim):  # rope_params of the official code: polar(1, outer(p, 1/θ^(2j/dim)))
        freqs = 1.0 / torch.pow(10000, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        return torch.polar(torch.ones(n, dim // 2, dtype=torch.float64), torch.outer(torch.arange(n, dtype=torch.float64), freqs))

    rope = WanRotary(128, (1, 2, 2))
    table = rope(torch.empty(1, 0, 3, 2, 2048))  # f=3, h=1, w=1024: only shapes are read
    assert table.shape == (1, 3 * 1024, 1, 64, 2) and table.dtype == torch.float32
    f_tab, h_tab, w_tab = official(1024, 44), official(1024, 42), official(1024, 42)
    token = 2 * 1024 + 1023  # frame 2, row 0, column 1023
    expected = torch.cat([f_tab[2], h_tab[0], w_tab[1023]])
    torch.testing.assert_close(table[0, token, 0, :, 0], expected.real.float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(table[0, token, 0, :, 1], expected.imag.float(), rtol=0, atol=1e-7)


def test_sinusoidal_features_cos_first_float64():
    t = torch.tensor([999.0, 0.0])
    feats = sinusoidal_features(t, 256)
    omega = 10000.0 ** (-torch.arange(128, dtype=torch.float64) / 128)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats[0, :128], torch.cos(999.0 * omega).float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(feats[0, 128:], torch.sin(999.0 * omega).float(), rtol=0, atol=1e-7)
    assert torch.equal(feats[1], torch.cat([torch.ones(128), torch.zeros(128)]))


# ---------------------------------------------------------------------------------------------
# Parity with diffusers.WanTransformer3DModel


class _Float64Timesteps(torch.nn.Module):
    """diffusers' timestep features with the official float64 arithmetic (ours), see test docstring."""

    def forward(self, t):
        return sinusoidal_features(t, 256)


def make_pair(cfg: WanDiTConfig, seed: int = 0, official_timesteps: bool = True):
    torch.manual_seed(seed)
    ours = WanModel(cfg).eval()
    with torch.no_grad():  # non-trivial values for parameters that start at 1 or 0
        for name, p in ours.named_parameters():
            if name.endswith((".bias", "norm_q.weight", "norm_k.weight", "norm3.weight")):
                p.add_(0.1 * torch.randn_like(p))
    theirs = diffusers_transformer(ours)  # official key names mapped, loaded strict=True
    if official_timesteps:
        theirs.condition_embedder.timesteps_proj = _Float64Timesteps()
    return ours, theirs


def inputs(cfg: WanDiTConfig, frames=3, height=6, width=8, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16 if cfg.model_type == "i2v" else cfg.in_dim, frames, height, width, generator=g)
    context = torch.randn(batch, 512, cfg.text_dim, generator=g)
    context[:, 7:] = 0  # umT5 output: zero rows after the prompt, not masked
    t = torch.tensor([999.0, 417.0][:batch])
    return x, t, context


def assert_parity(ours_out, theirs_out):
    assert ours_out.shape == theirs_out.shape
    err = (ours_out - theirs_out).abs().max().item()
    scale = theirs_out.abs().max().item()
    assert scale > 0.1
    assert err <= REL_TOL * scale, f"max abs err {err:.3e} vs scale {scale:.3e}"


def test_parity_t2v_with_diffusers():
    cfg = WanDiTConfig.tiny("t2v")
    ours, theirs = make_pair(cfg)
    x, t, context = inputs(cfg)
    with torch.no_grad():
        out = ours(x, t, context)
        ref = theirs(x, t, context, return_dict=False)[0]
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_parity(out, ref)


def test_diffusers_float32_timesteps_differ_only_slightly():
    """diffusers embeds t in float32, official Wan in float64: a known, small difference."""
    cfg = WanDiTConfig.tiny("t2v")
    ours, theirs = make_pair(cfg, official_timesteps=False)
    x, t, context = inputs(cfg)
    with torch.no_grad():
        out = ours(x, t, context)
        ref = theirs(x, t, context, return_dict=False)[0]
    err = (out - ref).abs().max().item()
    assert err <= 1e-3 * ref.abs().max().item()


def test_parity_i2v_channel_concat_with_diffusers():
    cfg = WanDiTConfig.tiny("i2v")
    ours, theirs = make_pair(cfg, seed=2)
    x, t, context = inputs(cfg, frames=2, height=4, width=4, seed=3)
    y = torch.randn(x.shape[0], 20, *x.shape[2:], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = ours(x, t, context, y=y)
        ref = theirs(torch.cat([x, y], 1), t, context, return_dict=False)[0]
    assert out.shape == x.shape  # out_dim 16
    assert_parity(out, ref)


def test_parity_ti2v_per_token_timesteps_with_diffusers():
    cfg = WanDiTConfig.tiny("ti2v")
    ours, theirs = make_pair(cfg, seed=5)
    x, t, context = inputs(cfg, frames=3, height=4, width=6, seed=6)
    f, h, w = 3, 2, 3
    per_token = t[:, None].repeat(1, f * h * w)
    per_token[:, : h * w] = 0  # TI2V image-to-video: frame-0 tokens at t = 0
    with torch.no_grad():
        out = ours(x, per_token, context)
        ref = theirs(x, per_token, context, return_dict=False)[0]
        constant = ours(x, t[:, None].expand(-1, f * h * w), context)
        scalar = ours(x, t, context)
    assert_parity(out, ref)
    torch.testing.assert_close(constant, scalar, rtol=0, atol=1e-6)


def test_unpatchify_channel_fastest():
    cfg = WanDiTConfig.tiny("t2v", num_layers=1)
    model = WanModel(cfg)
    f, h, w, C = 2, 3, 4, cfg.out_dim
    out = torch.arange(f * h * w * 4 * C, dtype=torch.float32).reshape(1, f * h * w, 4 * C)
    video = model.unpatchify(out, f, h, w)
    assert video.shape == (1, C, f, 2 * h, 2 * w)
    fi, ih, iw, ph, pw, c = 1, 2, 3, 1, 0, 5
    token = (fi * h + ih) * w + iw
    assert video[0, c, fi, 2 * ih + ph, 2 * iw + pw] == out[0, token, (ph * 2 + pw) * C + c]


# ---------------------------------------------------------------------------------------------
# Structure the core relies on (USP split points, no complex tensors)


class _DtypeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.dtypes.add(o.dtype)
        return out


def test_forward_has_no_complex_tensors():
    cfg = WanDiTConfig.tiny("ti2v", num_layers=1)
    model = WanModel(cfg).eval()
    x, t, context = inputs(cfg, frames=2, height=4, width=4, batch=1)
    recorder = _DtypeRecorder()
    with torch.no_grad(), recorder:
        model(x, t[:, None].expand(1, 8).contiguous(), context)
    assert recorder.dtypes and not any(d.is_complex for d in recorder.dtypes), recorder.dtypes


def test_usp_split_points_carry_tokens_on_dim_1():
    """The tensors the docstring tells USP to split have L = f·h·w on dim 1; head output too."""
    cfg = WanDiTConfig.tiny("ti2v", num_layers=1)
    model = WanModel(cfg).eval()
    x, t, context = inputs(cfg, frames=3, height=4, width=6, batch=1)
    L = 3 * 2 * 3
    seen = {}
    for name in ("patch_embedding", "rope", "time_features", "head"):
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o.shape))
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: calls.append([a_.shape for a_ in a]))
    with torch.no_grad():
        model(x, t[:, None].expand(1, L).contiguous(), context)
    assert seen["patch_embedding"] == (1, L, cfg.dim)
    assert seen["rope"] == (1, L, 1, cfg.head_dim // 2, 2)
    assert seen["time_features"] == (1, L, cfg.freq_dim)
    assert seen["head"] == (1, L, math.prod(cfg.patch_size) * cfg.out_dim)
    x_shape, e0_shape, ctx_shape, rope_shape = calls[0]
    assert (x_shape[1], e0_shape[1], rope_shape[1], ctx_shape[1]) == (L, L, L, 512)


def test_bf16_weights_keep_float32_residual_and_output():
    cfg = WanDiTConfig.tiny("t2v", num_layers=1)
    model = WanModel(cfg).eval()
    x, t, context = inputs(cfg, frames=2, height=4, width=4, batch=1)
    with torch.no_grad():
        ref = model(x, t, context)
        out = model.to(torch.bfloat16)(x, t, context.bfloat16())
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.slow
def test_dynamo_one_graph_across_resolutions_and_steps():
    """fullgraph (no graph breaks) and no recompilation when the resolution or t changes.

    (Sizes 0 and 1 are specialised by dynamo, so a grid axis of 1 would compile once more.)
    """
    import torch._dynamo.testing

    cfg = WanDiTConfig.tiny("t2v", num_layers=1)
    model = WanModel(cfg).eval()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    torch._dynamo.reset()
    with torch.no_grad():
        for (f, h, w), step in (((2, 4, 6), 999.0), ((3, 6, 4), 500.0)):
            x = torch.randn(1, 16, f, h, w)
            out = compiled(x, torch.tensor([step]), torch.randn(1, 512, cfg.text_dim))
            assert out.shape == x.shape
    assert counter.frame_count == 1


@pytest.mark.slow
def test_regional_compile_holds_one_block_graph_from_the_first_call():
    """Three blocks share one compiled forward, with no recompilation at the second instance.

    Called directly under ``no_grad`` (as a DiffSynth-style user would call the DiT), dynamo
    guards on whether the block input is a view; the patch embedding returns a fresh tensor so
    that the first block's input looks like every later block's input.
    """
    from core.compile import compile_components

    cfg = WanDiTConfig.tiny("t2v", num_layers=3)
    model = WanModel(cfg).eval()
    torch._dynamo.reset()
    report = compile_components({"dit": model}, repeated_blocks={}, methods={}, options={"dynamic": True})
    with torch.no_grad():
        model(torch.randn(1, 16, 2, 4, 6), torch.tensor([900.0]), torch.randn(1, 512, cfg.text_dim))
    assert report.graphs() == {"dit:WanAttentionBlock": 1}
