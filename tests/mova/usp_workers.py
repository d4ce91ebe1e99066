"""Rank functions for the MOVA USP tests (module level, so spawned ranks import them)."""
from __future__ import annotations

import torch

PROMPT = "a drummer on a rooftop at dusk"
IMAGE = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0))
# 9 frames at 24 fps: 19 audio tokens (remainder on 2 and 4 ranks); 48×32: 3·3·2 = 18 video tokens
UNEVEN = dict(num_frames=9, height=48, width=32)
BASE = dict(image=IMAGE, seed=5, num_inference_steps=2, guidance_scale=4.0, progress=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _compare(pipe, ref, **call) -> tuple[float, float]:
    got, want = pipe(PROMPT, **BASE, **call), ref(PROMPT, **BASE, **call)
    return _rel(got.video, want.video), _rel(got.audio, want.audio)


def _padded(pipe) -> dict[str, bool]:
    """Whether the last pass left a remainder (padded shards) in each component's sequences."""
    out = {}
    for name, handle in pipe.parallel.handles.items():
        for seq in ("tokens", "video", "audio"):
            if seq in handle.state:
                out[f"{name}.{seq}"] = handle.state.layout(seq, "test").padded
    return out


def degrees(layouts: list[tuple[int, int, bool]]) -> dict:
    """USP (ulysses, ring, cfg_parallel) layouts against one process, at the uneven sizes."""
    import core

    ref = core.load("mova", device="cpu")
    results = {}
    for u, r, cfg in layouts:
        pipe = core.load("mova", device="cpu", use_usp=True, ulysses_degree=u, ring_degree=r, cfg_parallel=cfg)
        results[f"u{u} r{r} cfg={cfg}"] = _compare(pipe, ref, **UNEVEN)
        if u * r > 1:
            results[f"u{u} r{r} cfg={cfg} padded"] = _padded(pipe)
        pipe.parallel.remove()
    return results


def compiled(layout: tuple[int, int, bool]) -> dict:
    """compile + USP equals eager + USP, and a second size and CFG setting do not recompile."""
    import core

    u, r, cfg = layout
    eager = core.load("mova", device="cpu", use_usp=True, ulysses_degree=u, ring_degree=r, cfg_parallel=cfg)
    comp = core.load("mova", device="cpu", use_usp=True, ulysses_degree=u, ring_degree=r, cfg_parallel=cfg)
    torch._dynamo.reset()
    comp.compile_pipeline()
    results = {"error": _compare(comp, eager, **UNEVEN)}
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            for call in (dict(num_frames=5, height=32, width=48), dict(UNEVEN, guidance_scale=1.0)):
                comp(PROMPT, **{**BASE, **call})
        results["recompiled"] = "no"
    except RuntimeError as exc:
        results["recompiled"] = str(exc)[-400:]
    return results
