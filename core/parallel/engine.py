"""The USP attention engine: every adaptation of xDiT (``xfuser``) and ``yunchang`` lives here.

Pins: ``xfuser==0.7.0``, ``yunchang==0.6.4`` (the newest pair when this was written).

- The engine is yunchang's ``LongContextAttention`` (Ulysses all-to-all around a "basic" ring
  attention with log-sum-exp merging), on the mesh's own Ulysses and ring groups.
- Its per-block kernel must return a *true* log-sum-exp, or the ring merge is silently wrong.
  On CPU it is ``aten._scaled_dot_product_flash_attention_for_cpu``; on CUDA SDPA's cuDNN
  kernel with ``compute_log_sumexp=True`` (it ran the DiT shapes ~1.6x faster than flash on
  an H200), falling back to the flash / memory-efficient kernels where cuDNN refuses
  (fp32, some head dims).  Both are plugged in as yunchang's ``attn_processor`` (yunchang calls
  the processor for an ``attn_type`` it does not know), so nothing of yunchang is patched.
- yunchang's own ``AttnType.TORCH_MATH`` and ``AttnType.TORCH_CUDNN`` return a *zero* LSE;
  with ring degree > 1 they are refused (:class:`ParallelError`), never run.
- ``xfuser``'s ``xFuserLongContextAttention`` is tried once per process (import + a tiny run
  checked against yunchang) and used if it works.  Known not to: with yunchang 0.6.4 it
  fails on CUDA with ``ImportError: cannot import name 'update_npu_out'``; on a CPU-only torch
  ``import xfuser`` fails on its triton import (and its class derives from ``object`` there),
  so on CPU it is not imported at all.  The fallback is announced in one log line with the reason.
  ``DITKIT_USP_ENGINE=yunchang`` skips the probe; ``=xfuser`` probes even on CPU.

Engine calls take this rank's ``(batch, shard, heads, head_dim)`` q/k/v of one sequence and an
explicit softmax scale, and return this rank's output shard.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable

import torch
import torch.distributed as dist

from core.errors import ParallelError

from .mesh import Mesh

__all__ = ["UspEngine", "make_engine", "cpu_flash_lse", "cuda_sdpa_lse"]

log = logging.getLogger("ditkit.parallel")

_ZERO_LSE_TYPES = ("torch_math", "torch_cudnn")


def cpu_flash_lse(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *args, **kwargs):
    """yunchang block kernel on CPU: ``(B, L, H, D)`` in, ``(out, lse[B, H, L] fp32)`` out."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, causal, scale=softmax_scale
    )
    return out.transpose(1, 2), lse.float()


_refused: set[tuple] = set()  # (kernel, head_dim, dtype) a CUDA kernel turned down; not asked again


def _lse(lse: torch.Tensor, b: int, h: int, length: int) -> torch.Tensor:
    # cuDNN may return (B, H, L, 1); the memory-efficient kernel pads L to a multiple of 32.
    return lse.reshape(b, h, -1)[..., :length].float()


def cuda_sdpa_lse(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *args, **kwargs):
    """yunchang block kernel on CUDA: cuDNN SDPA with its log-sum-exp, else flash, else efficient."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    b, h, length, d = qt.shape
    half = q.dtype in (torch.float16, torch.bfloat16)
    for name in ("cudnn", "flash", "efficient"):
        key = (name, d, q.dtype)
        if key in _refused or (name != "efficient" and not half):
            continue
        try:
            if name == "cudnn":
                out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    qt, kt, vt, None, True, dropout_p, causal, False, scale=softmax_scale
                )[:2]
            elif name == "flash":
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                    qt, kt, vt, dropout_p, causal, False, scale=softmax_scale
                )[:2]
            else:
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                    qt, kt, vt, None, True, dropout_p, causal, scale=softmax_scale
                )[:2]
        except RuntimeError as exc:  # a shape / dtype / arch this kernel does not support
            if name == "efficient":
                raise
            _refused.add(key)
            log.warning("USP: %s SDPA refused head_dim %d %s (%s); trying the next kernel", name, d, q.dtype,
                        str(exc).splitlines()[0][:200])
            continue
        return out.transpose(1, 2), _lse(lse, b, h, length)
    raise AssertionError("unreachable")


class UspEngine:
    """Sequence-parallel attention over a :class:`Mesh`; call with ``(q, k, v, scale)``."""

    def __init__(self, mesh: Mesh, fn: Callable, name: str):
        self.mesh = mesh
        self._fn = fn
        self.name = name

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return self._fn(q, k, v, scale)

    def __repr__(self) -> str:
        return f"UspEngine({self.name}, ulysses={self.mesh.ulysses_degree}, ring={self.mesh.ring_degree})"


def _yunchang(mesh: Mesh, attn_type: str | None) -> UspEngine:
    from yunchang import LongContextAttention
    from yunchang.kernels import AttnType

    if attn_type is None:
        processor = cuda_sdpa_lse if mesh.device.type == "cuda" else cpu_flash_lse
        kind, label = None, processor.__name__
    else:
        try:
            kind = AttnType.from_string(attn_type)
        except ValueError:
            raise ParallelError(
                f"unknown yunchang attn_type {attn_type!r}; known: {[t.value for t in AttnType]}"
            ) from None
        if kind.value in _ZERO_LSE_TYPES and mesh.ring_degree > 1:
            raise ParallelError(
                f"yunchang attn_type {attn_type!r} returns a zero log-sum-exp, which makes ring attention "
                f"silently wrong; ring degree is {mesh.ring_degree}. Use the default kernel or ring degree 1."
            )
        processor, label = None, attn_type
    attn = LongContextAttention(ring_impl_type="basic", attn_type=kind, attn_processor=processor)
    attn.ulysses_pg, attn.ring_pg = mesh.ulysses_group, mesh.ring_group

    def run(q, k, v, scale):
        return attn(q, k, v, softmax_scale=scale, causal=False)

    return UspEngine(mesh, run, f"yunchang.LongContextAttention[{label}]")


_xfuser_verdict: str | None = None  # why xfuser is not used, once decided for this process


def _try_xfuser(mesh: Mesh, fallback: UspEngine) -> UspEngine | None:
    """xfuser's engine if it imports and matches yunchang on a tiny run; else ``None``."""
    global _xfuser_verdict
    choice = os.environ.get("DITKIT_USP_ENGINE", "auto")
    if choice == "yunchang":
        return None
    if _xfuser_verdict is not None:
        return None
    reason = None
    if mesh.device.type != "cuda" and choice != "xfuser":
        reason = "CPU run: xfuser's attention needs CUDA (on CPU `import xfuser` fails on triton)"
    elif importlib.util.find_spec("xfuser") is None:
        reason = "xfuser is not installed"
    elif importlib.util.find_spec("triton") is None:
        reason = "triton is not installed (`import xfuser` needs it)"
    engine = None
    if reason is None:
        try:
            from xfuser.core.long_ctx_attention import xFuserLongContextAttention
            from yunchang.kernels import AttnType

            xattn = xFuserLongContextAttention(attn_type=AttnType.TORCH_EFFICIENT)
            xattn.ulysses_pg, xattn.ring_pg = mesh.ulysses_group, mesh.ring_group

            def run(q, k, v, scale):
                return xattn(None, q, k, v, softmax_scale=scale)

            gen = torch.Generator(device="cpu").manual_seed(1234 + mesh.rank)
            heads = 2 * mesh.ulysses_degree
            q, k, v = (torch.randn(1, 8, heads, 64, generator=gen).to(mesh.device, torch.bfloat16) for _ in range(3))
            got = run(q, k, v, 0.125)
            want = fallback(q, k, v, 0.125)
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            if not err < 2e-2:
                raise RuntimeError(f"tiny run differs from yunchang (relative error {err:.3g})")
            engine = UspEngine(mesh, run, "xfuser.xFuserLongContextAttention")
        except Exception as exc:  # anything: the fallback is yunchang, announced below
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    if dist.is_initialized() and mesh.device.type == "cuda" and choice != "yunchang":
        # All ranks must agree, or some would run xfuser's collectives and others yunchang's.
        ok = torch.tensor([0 if reason else 1], device=mesh.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if reason is None and not ok.item():
            reason, engine = "xfuser failed on another rank", None
    if reason is not None:
        _xfuser_verdict = reason
        if mesh.rank == 0:
            log.warning("USP engine: yunchang LongContextAttention (xfuser not used: %s)", reason)
    return engine


def make_engine(mesh: Mesh, attn_type: str | None = None) -> UspEngine:
    """The USP engine for ``mesh``: xfuser's when it works, else yunchang's (see module docstring).

    ``attn_type`` selects one of yunchang's own block kernels by its ``AttnType`` value (e.g.
    ``"fa"``, ``"fa3"``); ``None`` uses the LSE-returning SDPA kernels above.
    """
    fallback = _yunchang(mesh, attn_type)
    if attn_type is None:
        xf = _try_xfuser(mesh, fallback)
        if xf is not None:
            return xf
    return fallback
