"""Tiny models shaped like the reference plugins, with their USP adapters (test helpers)."""
from __future__ import annotations

import torch
from torch import nn

from core.attention import attention
from core.spec import AttentionSite, SequenceGather, SequenceSplit, UspAdapter

HEADS = 4


def rope(x, cos, sin):
    """Real-valued rotary embedding; ``x`` is (B, L, H, D), ``cos``/``sin`` are (L, D/2)."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)


class Rope(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv", 1.0 / 100 ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def forward(self, length: int):
        ang = torch.outer(torch.arange(length, dtype=torch.float32), self.inv)
        return ang.cos(), ang.sin()


class Attn(nn.Module):
    def __init__(self, dim: int, ctx_dim: int | None = None):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(ctx_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, ctx=None, *, site, cos=None, sin=None, kv_cos=None, kv_sin=None, **site_args):
        b = x.shape[0]
        ctx = x if ctx is None else ctx
        q = self.q(x).view(b, x.shape[1], HEADS, -1)
        k, v = (t.view(b, ctx.shape[1], HEADS, -1) for t in self.kv(ctx).chunk(2, dim=-1))
        if cos is not None:
            q = rope(q, cos, sin)
        if kv_cos is not None:
            k = rope(k, kv_cos, kv_sin)
        return self.out(attention(q, k, v, site=site, **site_args).flatten(2))


class Block(nn.Module):
    def __init__(self, dim, ctx_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.self_attn = Attn(dim)
        self.cross = Attn(dim, ctx_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, cos, sin, context, tmod):
        h = self.norm(x) * (1 + tmod)
        x = x + self.self_attn(h, site="self", cos=cos, sin=sin, kv_cos=cos, kv_sin=sin)
        x = x + self.cross(x, context, site="cross")
        return x + self.mlp(x)


class ToyDiT(nn.Module):
    """Wan-like: patch embed, rotary table, per-token modulation, self + cross attention, head."""

    def __init__(self, in_dim=6, dim=48, ctx_dim=8, depth=2):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.rope = Rope(dim // HEADS)
        self.blocks = nn.ModuleList(Block(dim, ctx_dim) for _ in range(depth))
        self.head = nn.Linear(dim, in_dim)

    def forward(self, x, context, tmod=None):
        cos, sin = self.rope(x.shape[1])
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, cos, sin, context, 0.0 if tmod is None else tmod)
        return self.head(h)


DIT_ADAPTER = UspAdapter(
    component="dit",
    heads=HEADS,
    splits=[
        SequenceSplit(module="", at="input", arg="tmod", dim=1),
        SequenceSplit(module="embed", at="output", dim=1),
        SequenceSplit(module="rope", at="output", arg=0, dim=0),
        SequenceSplit(module="rope", at="output", arg=1, dim=0),
    ],
    gathers=[SequenceGather(module="head", at="output", dim=1)],
    sites={"self": AttentionSite(strategy="parallel"), "cross": AttentionSite(strategy="local")},
)


class JointBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv_img, self.qkv_txt = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.out_img, self.out_txt = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, img, txt, cos, sin):
        b, t = img.shape[0], txt.shape[1]
        qi, ki, vi = (x.view(b, img.shape[1], HEADS, -1) for x in self.qkv_img(img).chunk(3, -1))
        qt, kt, vt = (x.view(b, t, HEADS, -1) for x in self.qkv_txt(txt).chunk(3, -1))
        qi, ki = rope(qi, cos, sin), rope(ki, cos, sin)
        q, k, v = (torch.cat(p, dim=1) for p in ((qt, qi), (kt, ki), (vt, vi)))
        o = attention(q, k, v, site="joint", text_len=t).flatten(2)
        return img + self.out_img(o[:, t:]), txt + self.out_txt(o[:, :t])


class ToyJoint(nn.Module):
    """Qwen-Image-like: joint attention over [text, image]; image split, text replicated."""

    def __init__(self, in_dim=6, txt_dim=5, dim=48, depth=2):
        super().__init__()
        self.img_embed, self.txt_embed = nn.Linear(in_dim, dim), nn.Linear(txt_dim, dim)
        self.rope = Rope(dim // HEADS)
        self.blocks = nn.ModuleList(JointBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, in_dim)

    def forward(self, img, txt):
        cos, sin = self.rope(img.shape[1])
        i, t = self.img_embed(img), self.txt_embed(txt)
        for block in self.blocks:
            i, t = block(i, t, cos, sin)
        return self.head(i), t


JOINT_ADAPTER = UspAdapter(
    component="transformer",
    heads=HEADS,
    splits=[
        SequenceSplit(sequence="image", module="img_embed", at="output"),
        SequenceSplit(sequence="image", module="rope", at="output", arg=0, dim=0),
        SequenceSplit(sequence="image", module="rope", at="output", arg=1, dim=0),
    ],
    gathers=[SequenceGather(sequence="image", module="head", at="output")],
    sites={"joint": AttentionSite(strategy="joint", sequence="image")},
)


class ToyTwoTower(nn.Module):
    """MOVA-like: video and audio towers, each split on its own; bridges gather the other's K/V."""

    def __init__(self, v_dim=6, a_dim=3, dim=32, depth=2):
        super().__init__()
        self.v_embed, self.a_embed = nn.Linear(v_dim, dim), nn.Linear(a_dim, dim)
        self.v_self = nn.ModuleList(Attn(dim) for _ in range(depth))
        self.a_self = nn.ModuleList(Attn(dim) for _ in range(depth))
        self.v2a = nn.ModuleList(Attn(dim) for _ in range(depth))
        self.a2v = nn.ModuleList(Attn(dim) for _ in range(depth))
        self.v_head, self.a_head = nn.Linear(dim, v_dim), nn.Linear(dim, a_dim)

    def forward(self, video, audio):
        v, a = self.v_embed(video), self.a_embed(audio)
        for vs, as_, v2a, a2v in zip(self.v_self, self.a_self, self.v2a, self.a2v):
            v = v + vs(v, site="video_self")
            a = a + as_(a, site="audio_self")
            v, a = v + v2a(v, a, site="v2a"), a + a2v(a, v, site="a2v")
        return self.v_head(v), self.a_head(a)


TOWER_ADAPTER = UspAdapter(
    component="dit",
    heads=HEADS,
    splits=[
        SequenceSplit(sequence="video", module="v_embed", at="output"),
        SequenceSplit(sequence="audio", module="a_embed", at="output"),
    ],
    gathers=[
        SequenceGather(sequence="video", module="v_head", at="output"),
        SequenceGather(sequence="audio", module="a_head", at="output"),
    ],
    sites={
        "video_self": AttentionSite(strategy="parallel", sequence="video"),
        "audio_self": AttentionSite(strategy="parallel", sequence="audio"),
        "v2a": AttentionSite(strategy="gather_kv", sequence="video", kv_sequence="audio"),
        "a2v": AttentionSite(strategy="gather_kv", sequence="audio", kv_sequence="video"),
    },
)


class SelfAttentionOnly(nn.Module):
    """Raw attention under USP: q/k/v split at the input, the output gathered."""

    def forward(self, q, k, v, scale=None):
        return attention(q, k, v, site="self", scale=scale)


RAW_ADAPTER = UspAdapter(
    component="raw",
    heads=HEADS,
    splits=[SequenceSplit(module="", at="input", arg=name, dim=1) for name in ("q", "k", "v")],
    gathers=[SequenceGather(module="", at="output", dim=1)],
    sites={"self": AttentionSite(strategy="parallel")},
)
