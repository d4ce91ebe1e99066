"""Functions the multi-process tests run on every rank (module level, so spawn can import them).

Each worker checks its own results and raises on a mismatch, so a failure on any rank fails
the test (via core.parallel.launch) with that rank's message.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.errors import ParallelError
from core.parallel import (
    assert_same_on_ranks,
    attach_usp,
    enable_usp,
    init_mesh,
    make_engine,
)

from . import _toys

FP32_TOL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _check(name: str, got, want, tol: float, results: dict) -> None:
    err = rel_err(got, want)
    results[name] = err
    if not err <= tol:
        raise AssertionError(f"rank {dist.get_rank()}: {name}: relative error {err:.3g} > {tol:g}")


def _qkv(length: int, dtype=torch.float32, heads=_toys.HEADS, head_dim=12, seed=0):
    g = torch.Generator().manual_seed(seed + length)
    return [torch.randn(2, length, heads, head_dim, generator=g).to(dtype) for _ in range(3)]


def raw_attention(mesh, lengths, results, dtype=torch.float32, tol=FP32_TOL, tag=""):
    model = _toys.SelfAttentionOnly()
    with enable_usp(model, _toys.RAW_ADAPTER, mesh):
        for length in lengths:
            q, k, v = _qkv(length, dtype)
            want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
            got = model(q, k, v)
            _check(f"raw{tag} u{mesh.ulysses_degree}r{mesh.ring_degree} L={length}", got, want, tol, results)
            # an explicit (non-default) softmax scale must survive the widened head dim
            want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=0.3).transpose(1, 2)
            got = model(q, k, v, scale=0.3)
            _check(f"raw{tag} scale u{mesh.ulysses_degree}r{mesh.ring_degree} L={length}", got, want, tol, results)


def naive_padding(mesh, length, results):
    """Control: the same shards without the key mask (what peers do) are measurably wrong."""
    from core.parallel import ShardLayout, gather_tensor, shard_tensor

    q, k, v = _qkv(length)
    layout = ShardLayout(length, mesh.sp_degree, mesh.sp_rank)
    shards = [shard_tensor(t, 1, layout) for t in (q, k, v)]
    got = gather_tensor(make_engine(mesh)(*shards, scale=12**-0.5), 1, layout, mesh.sp_group)
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    results["naive zero padding"] = err = rel_err(got, want)
    if not err > 1e-2:
        raise AssertionError(f"unmasked padding should be visibly wrong, error {err:.3g}")


def toy_dit(mesh, lengths, results):
    torch.manual_seed(0)
    model = _toys.ToyDiT().eval()
    for length in lengths:
        g = torch.Generator().manual_seed(length)
        x, ctx = torch.randn(2, length, 6, generator=g), torch.randn(2, 5, 8, generator=g)
        tmod = 0.1 * torch.randn(2, length, 48, generator=g)
        with torch.no_grad():
            want = model(x, ctx, tmod=tmod)
            with enable_usp(model, _toys.DIT_ADAPTER, mesh):
                got = model(x, ctx, tmod=tmod)
            after = model(x, ctx, tmod=tmod)
        _check(f"toy_dit u{mesh.ulysses_degree}r{mesh.ring_degree} L={length}", got, want, FP32_TOL, results)
        if not torch.equal(after, want):
            raise AssertionError("removing the USP handle did not restore the single-process model")


def toy_joint(mesh, results, img_len=11, txt_len=5):
    torch.manual_seed(1)
    model = _toys.ToyJoint().eval()
    g = torch.Generator().manual_seed(7)
    img, txt = torch.randn(2, img_len, 6, generator=g), torch.randn(2, txt_len, 5, generator=g)
    with torch.no_grad():
        want_img, want_txt = model(img, txt)
        with enable_usp(model, _toys.JOINT_ADAPTER, mesh):
            got_img, got_txt = model(img, txt)
    tag = f"u{mesh.ulysses_degree}r{mesh.ring_degree} img={img_len} txt={txt_len}"
    _check(f"joint image {tag}", got_img, want_img, FP32_TOL, results)
    _check(f"joint text {tag}", got_txt, want_txt, FP32_TOL, results)
    assert_same_on_ranks(got_txt, mesh.sp_group, what="joint text stream")  # bit-identical on every rank


def toy_towers(mesh, results, video_len=14, audio_len=9):
    torch.manual_seed(2)
    model = _toys.ToyTwoTower().eval()
    g = torch.Generator().manual_seed(3)
    video, audio = torch.randn(1, video_len, 6, generator=g), torch.randn(1, audio_len, 3, generator=g)
    with torch.no_grad():
        want_v, want_a = model(video, audio)
        with enable_usp(model, _toys.TOWER_ADAPTER, mesh):
            got_v, got_a = model(video, audio)
    tag = f"u{mesh.ulysses_degree}r{mesh.ring_degree} video={video_len} audio={audio_len}"
    _check(f"towers video {tag}", got_v, want_v, FP32_TOL, results)
    _check(f"towers audio {tag}", got_a, want_a, FP32_TOL, results)


def expect_parallel_error(fn, results, name):
    try:
        fn()
    except ParallelError as exc:
        results[name] = str(exc)
        return
    raise AssertionError(f"{name}: no ParallelError")


def noise_checks(mesh, results):
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(42))
    assert_same_on_ranks(noise, what="initial noise")  # same seed: passes
    bad = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(42 + dist.get_rank()))
    expect_parallel_error(lambda: assert_same_on_ranks(bad, what="initial noise"), results, "noise diverged")
    one_bit = noise.clone()
    if dist.get_rank() == dist.get_world_size() - 1:
        one_bit.view(-1)[5] = torch.nextafter(one_bit.view(-1)[5], torch.tensor(1e9))
    expect_parallel_error(lambda: assert_same_on_ranks(one_bit, what="noise"), results, "one ulp diverged")


def world2():
    """Every 2-rank check in one job (process start-up is the main cost)."""
    results: dict = {}
    lengths = [8, 7, 5, 1]
    for u, r in [(2, 1), (1, 2)]:
        mesh = init_mesh(heads=_toys.HEADS, ulysses_degree=u, ring_degree=r)
        raw_attention(mesh, lengths, results)
        raw_attention(mesh, [9, 6], results, dtype=torch.bfloat16, tol=1e-2, tag=" bf16")
        toy_dit(mesh, [10, 7], results)
        toy_joint(mesh, results)
        toy_towers(mesh, results)
    ring = init_mesh(ulysses_degree=1, ring_degree=2)
    naive_padding(ring, 7, results)
    expect_parallel_error(lambda: make_engine(ring, attn_type="torch_math"), results, "torch_math with ring")
    make_engine(init_mesh(ulysses_degree=2, ring_degree=1), attn_type="torch_math")  # ring 1: allowed
    noise_checks(ring, results)
    return results


def world4():
    """Every 4-rank check in one job."""
    results: dict = {}
    for u, r in [(4, 1), (2, 2), (1, 4)]:
        mesh = init_mesh(heads=_toys.HEADS, ulysses_degree=u, ring_degree=r)
        raw_attention(mesh, [8, 7, 5, 3], results)  # 5 and 3 leave a rank with padding only
        toy_dit(mesh, [9], results)
        toy_joint(mesh, results, img_len=10, txt_len=3)
        toy_towers(mesh, results, video_len=13, audio_len=6)
    # CFG parallel through the pipeline runtime: ranks 0-1 run "cond", 2-3 "uncond", each with USP.
    torch.manual_seed(0)
    model = _toys.ToyDiT().eval()
    model.config = {"num_heads": _toys.HEADS}  # the adapter below reads its head count from here
    pipe = _FakePipeline(model, _toys.DIT_ADAPTER.model_copy(update={"heads": "num_heads"}))
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 7, 6, generator=g), {"cond": torch.randn(1, 4, 8, generator=g), "uncond": torch.zeros(1, 4, 8)}
    with torch.no_grad():
        want = {b: model(x, ctx[b]) for b in ("cond", "uncond")}
        runtime = attach_usp(pipe, ring_degree=2, cfg_parallel=True)
        mesh = runtime.mesh
        assert (mesh.ulysses_degree, mesh.ring_degree, mesh.cfg_degree) == (1, 2, 2), runtime
        got = runtime.run_branches(lambda b: pipe.dit(x, ctx[b]), ("cond", "uncond"))
        runtime.remove()
    for b in ("cond", "uncond"):
        _check(f"cfg {b} u1r2x2 L=7", got[b], want[b], FP32_TOL, results)
    noise_checks(mesh, results)
    return results


class _FakePipeline:
    """Just what attach_usp reads from a core.Pipeline."""

    def __init__(self, dit, adapter):
        self.dit, self.device = dit, torch.device("cpu")
        self.spec = type("Spec", (), {"usp": [adapter], "name": "toy"})()
        self.parallel = None


def fail_on_rank(bad_rank: int):
    """One rank raises after init; the others block in a collective it never joins."""
    init_mesh(ulysses_degree=dist.get_world_size() if dist.is_initialized() else None)
    if dist.get_rank() == bad_rank:
        time.sleep(0.2)
        raise ValueError(f"boom on rank {bad_rank}")
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.all_reduce(t)
    return "unreachable"


def sleep_forever():
    time.sleep(600)
