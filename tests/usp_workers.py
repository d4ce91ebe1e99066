"""Rank functions for the pipeline-level USP tests (module level, so spawned ranks import them)."""
from __future__ import annotations

import sys

import torch

PROMPT = "a lighthouse on a cliff at dusk"
UNEVEN = dict(height=48, width=112)  # 3×7 = 21 image tokens: divides by neither 2 nor 4
EVEN = dict(height=64, width=64)  # 4×4... 8×8 = 64 tokens


def _subject(site: str):
    sys.path.insert(0, site)
    from core.testing import Subject

    return Subject("example-dit", plugin="ditkit_example.plugin")


def _error(pipe, ref, **call) -> float:
    from core.testing.checks import rel_error

    args = {"seed": 3, "num_inference_steps": 2, "progress": False, "guidance_scale": 3.0, **call}
    return rel_error(pipe(PROMPT, **args).tensor(), ref(PROMPT, **args).tensor())


def four_ranks(site: str) -> dict:
    """Ulysses 4, Ulysses 2 × ring 2, and cfg-parallel (CFG branches on two rank halves)."""
    subject = _subject(site)
    ref = subject.build()
    results = {}
    for u, r, cfg in [(4, 1, False), (2, 2, False), (2, 1, True), (1, 2, True)]:
        pipe = subject.build(use_usp=True, ulysses_degree=u, ring_degree=r, cfg_parallel=cfg)
        for name, call in (("uneven", UNEVEN), ("even", EVEN)):
            results[f"u{u} r{r} cfg={cfg} {name}"] = _error(pipe, ref, **call)
        pipe.parallel.remove()
    return results


def compile_and_diverge(site: str) -> dict:
    """compile + USP equals eager + USP with no recompilation; ranks with different seeds fail."""
    import torch.distributed as dist

    from core.errors import ParallelError

    subject = _subject(site)
    results = {}
    eager = subject.build(use_usp=True, ulysses_degree=1, ring_degree=2)
    compiled = subject.build(use_usp=True, ulysses_degree=1, ring_degree=2)
    compiled.compile_pipeline()
    results["compile+usp vs eager+usp"] = _error(compiled, eager, **UNEVEN)
    # offload under USP: every rank moves its own weights per block / per component, same output
    for mode in ("block", "model"):
        offloaded = subject.build(use_usp=True, ulysses_degree=1, ring_degree=2, offload=mode)
        args = {"seed": 3, "num_inference_steps": 2, "progress": False, "guidance_scale": 3.0, **UNEVEN}
        same = torch.equal(offloaded(PROMPT, **args).tensor(), eager(PROMPT, **args).tensor())
        results[f"usp+{mode} offload equals usp"] = same and offloaded.offload.materialised() == []
        offloaded.parallel.remove()
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            for scale, call in [(1.0, UNEVEN), (3.0, EVEN), (1.0, dict(height=32, width=80))]:
                compiled(PROMPT, seed=4, num_inference_steps=3, progress=False, guidance_scale=scale, **call)
        results["recompiled"] = "no"
    except RuntimeError as exc:
        results["recompiled"] = str(exc)[-400:]
    try:
        eager(PROMPT, seed=dist.get_rank(), num_inference_steps=1, progress=False)
        results["divergence"] = "not detected"
    except ParallelError as exc:
        results["divergence"] = str(exc)
    return results


def failing_rank(site: str) -> None:
    """Rank 1 raises in the middle of generation: every rank must stop, none hang."""
    import torch.distributed as dist

    subject = _subject(site)
    pipe = subject.build(use_usp=True)
    if dist.get_rank() == 1:
        original = pipe.dit.forward

        def broken(*args, **kwargs):
            raise RuntimeError("rank 1 fell over")

        pipe.dit.forward = broken
        del original
    pipe(PROMPT, seed=0, num_inference_steps=2, progress=False)


def wan_four_ranks() -> dict:
    """Wan tiny (2 heads) on 4 ranks: Ulysses 2 × ring 2 and ring 4; T2V and TI2V (per-token
    timesteps split with the tokens, image latent in frame 0); 2·3·5 = 30 tokens, uneven over 4."""
    from core.testing import Subject
    from core.testing.checks import rel_error

    results = {}
    for name in ("wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"):
        subject = Subject(name)
        ref = subject.build()
        size = dict(height=48, width=80) if name.startswith("wan2.1") else dict(height=96, width=160)
        extra = {"image": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))} if "ti2v" in name else {}
        for u, r in [(2, 2), (1, 4)]:
            pipe = subject.build(use_usp=True, ulysses_degree=u, ring_degree=r)
            args = subject.call_args(seed=5, guidance_scale=3.0, num_frames=5, **size, **extra)
            results[f"{name} u{u} r{r}"] = rel_error(pipe(PROMPT, **args).tensor(), ref(PROMPT, **args).tensor())
            pipe.parallel.remove()
    return results
