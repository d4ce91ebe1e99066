"""Rank functions for the pipeline-level USP tests (module level, so spawned ranks import them)."""
from __future__ import annotations

import sys

import torch

PROMPT = "a lighthouse on a cliff at dusk"
UNEVEN = dict(height=40, width=56)  # (40/8)·(56/8) = 35 image tokens: remainder 1 on 2 ranks, 3 on 4
EVEN = dict(height=64, width=64)  # 4×4... 8×8 = 64 tokens


def _subject(site: str):
    sys.path.insert(0, site)
    from core.testing import Subject

    return Subject("example-dit", plugin="ditkit_example.plugin")


def _error(pipe, ref, **call) -> float:
    from core.testing.checks import rel_error

    args = {"seed": 3, "num_inference_steps": 2, "progress": False, "guidance_scale": 3.0, **call}
    return rel_error(pipe(PROMPT, **args).tensor(), ref(PROMPT, **args).tensor())


def _output(pipe, **call):
    args = {"seed": 3, "num_inference_steps": 2, "progress": False, "guidance_scale": 3.0, **call}
    return pipe(PROMPT, **args).tensor()


def _gathered_bytes_per_block(dit) -> list[int]:
    """Hooks on every block: the bytes of the DiT's parameters that are whole (not a shard) when
    the block starts. Sharded weights must hold the root's own parameters and that block only."""
    from torch.distributed.tensor import DTensor

    from core.compile import _block_classes

    seen, handles = [], []

    def count(module, args):
        seen.append(sum(p.numel() * p.element_size() for p in dit.parameters() if not isinstance(p, DTensor)))

    for cls_name in dit._repeated_blocks:
        for block in _block_classes("dit", dit, cls_name)[1]:
            handles.append(block.register_forward_pre_hook(count))
    return seen, handles


def _offload_policies(dit) -> dict[str, str]:
    """FSDP's offload policy per unit kind of the sharded DiT: the root, and the set over blocks.
    (FSDP2 has no public accessor; its param group holds the policy it applies.)"""
    policies = {}
    for path, m in dit.named_modules():
        if hasattr(m, "_get_fsdp_state"):
            name = type(m._get_fsdp_state()._fsdp_param_group.offload_policy).__name__
            policies.setdefault("root" if not path else "blocks", set()).add(name)
    return {k: sorted(v) for k, v in policies.items()}


def sharded_weights(subject, ref, unsharded, results: dict, tag: str, **layout) -> object:
    """``shard_weights=True`` on this USP layout: bit-identical to the same layout unsharded, equal
    to one process, on an uneven token count (remainder asserted); this rank holds 1/N of the DiT's
    parameters (reported by ``pipe.parallel.weight_shards``) and gathers one block at a time."""
    import torch.distributed as dist

    from core.parallel.weight_shards import local_bytes, parameter_bytes

    world = dist.get_world_size()
    pipe = subject.build(use_usp=True, shard_weights=True, **layout)
    report = pipe.parallel.weight_shards.components["dit"]
    pipe.parallel.clear_splits()
    got = _output(pipe, **UNEVEN)
    remainders = [s["remainder"] for s in pipe.parallel.splits()]
    assert any(remainders), f"the uneven case split nothing with a remainder: {pipe.parallel.splits()}"
    results[f"{tag} sharded vs one process uneven"] = rel_error_of(got, _output(ref, **UNEVEN))
    results[f"{tag} sharded vs unsharded uneven (bitwise)"] = (got - _output(unsharded, **UNEVEN)).abs().max().item()
    results[f"{tag} sharded vs one process even"] = _error(pipe, ref, **EVEN)
    # per-rank bytes: what the report says is what this rank holds, 1/N of the whole up to padding
    total = parameter_bytes(ref.dit)
    mine = local_bytes(pipe.dit)
    summed = torch.tensor([mine], dtype=torch.int64)
    dist.all_reduce(summed)
    params = list(ref.dit.parameters())
    padding = sum(p[0].numel() * p.element_size() for p in params if p.dim()) + sum(p.element_size() for p in params)
    assert report.total_bytes == total and report.rank_bytes == mine, (report, total, mine)
    assert mine <= total / world + padding and total <= summed.item() <= total + world * padding, (mine, total, summed)
    results[f"{tag} dit bytes on this rank / whole"] = mine / total
    # gathered just in time: at each block, the root's own parameters plus that block, never more
    from core.compile import _block_classes

    blocks = [b for c in ref.dit._repeated_blocks for b in _block_classes("dit", ref.dit, c)[1]]
    own = total - sum(parameter_bytes(b) for b in blocks)
    seen, handles = _gathered_bytes_per_block(pipe.dit)
    _output(pipe, **EVEN)
    for h in handles:
        h.remove()
    assert seen and max(seen) <= own + max(parameter_bytes(b) for b in blocks), (seen, own)
    results[f"{tag} most gathered at a block / whole"] = max(seen) / total
    return pipe


def four_ranks(site: str) -> dict:
    """Ulysses 4, Ulysses 2 × ring 2, and cfg-parallel (CFG branches on two rank halves); sharded
    weights on Ulysses 2 × ring 2."""
    subject = _subject(site)
    ref = subject.build()
    results = {}
    for u, r, cfg in [(4, 1, False), (2, 2, False), (2, 1, True), (1, 2, True)]:
        pipe = subject.build(use_usp=True, ulysses_degree=u, ring_degree=r, cfg_parallel=cfg)
        for name, call in (("uneven", UNEVEN), ("even", EVEN)):
            results[f"u{u} r{r} cfg={cfg} {name}"] = _error(pipe, ref, **call)
        if (u, r, cfg) == (2, 2, False):
            sharded_weights(subject, ref, pipe, results, "u2 r2", ulysses_degree=2, ring_degree=2)
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
    # sharded weights + block offload: FSDP keeps each block's shard in host memory, the DiT's own
    # parameters on the device; core.offload handles the other components and leaves the DiT alone
    both = subject.build(use_usp=True, ulysses_degree=1, ring_degree=2, shard_weights=True, offload="block")
    results["usp+shard+block equals usp (bitwise)"] = torch.equal(_output(both, **UNEVEN), _output(eager, **UNEVEN))
    results["usp+shard+block fsdp offload policies"] = _offload_policies(both.dit)
    results["usp+shard+block left to fsdp"] = list(both.offload.sharded), sorted({u.component for u in both.offload.units})
    both.parallel.remove()
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
    # sharded weights, eager then compiled: one more graph per block class (the FSDP subclass of
    # each block is a new type for dynamo), then none
    from core.compile import graphs_compiled

    sharded = sharded_weights(subject, subject.build(), eager, results, "u1 r2", ulysses_degree=1, ring_degree=2)
    before = {p.target: graphs_compiled(p) for p in compiled.compile_report.parts if p.how == "regional"}
    report = sharded.compile_pipeline(compile_models=["dit"])
    results["compile+shard vs eager+usp"] = rel_error_of(_output(sharded, **UNEVEN), _output(eager, **UNEVEN))
    first = {p.target: graphs_compiled(p) - before[p.target] for p in report.parts}
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            for scale, call in [(1.0, EVEN), (3.0, dict(height=32, width=80))]:
                _output(sharded, guidance_scale=scale, **call)
        results["compile+shard recompiled"] = "no"
    except RuntimeError as exc:
        results["compile+shard recompiled"] = str(exc)[-400:]
    results["compile+shard graphs per block class"] = first
    results.update(_lora_under_usp(eager, compiled, sharded))
    return results


def _lora_under_usp(eager, compiled, sharded) -> dict:
    """The same LoRA on every rank: compile + USP + LoRA equals eager + USP + LoRA without a
    recompile, and a rank whose weights differ (another scale) stops every rank. On weights sharded
    across ranks a LoRA is refused (each rank holds rows of the weight, not the weight)."""
    import torch.distributed as dist

    from core.errors import InputError, ParallelError

    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, layer in eager.dit.named_modules():
        if isinstance(layer, torch.nn.Linear):
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g)
            lora[f"transformer.{name}.lora_B.weight"] = 0.05 * torch.randn(layer.out_features, 2, generator=g)
    out = {}
    try:
        sharded.load_lora(lora, 0.8)
        out["lora on sharded weights"] = "accepted"
    except InputError as exc:
        out["lora on sharded weights"] = str(exc)
    for pipe in (eager, compiled):
        pipe.load_lora(lora, 0.8, adapter_name="style")
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            out["lora compile+usp vs eager+usp"] = _error(compiled, eager, **UNEVEN)
            compiled.set_lora_scale("style", 0.4)
            eager.set_lora_scale("style", 0.4)
            out["lora rescaled compile+usp vs eager+usp"] = _error(compiled, eager, **UNEVEN)
        out["lora recompiled"] = "no"
    except RuntimeError as exc:
        out["lora recompiled"] = str(exc)[-400:]
    try:
        eager.set_lora_scale("style", 1.0 + dist.get_rank())
        out["lora divergence"] = "not detected"
    except ParallelError as exc:
        out["lora divergence"] = str(exc)
    return out


def rel_error_of(got, ref) -> float:
    from core.testing.checks import rel_error

    return rel_error(got, ref)


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
