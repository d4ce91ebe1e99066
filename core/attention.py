"""The one attention entry point every plugin model calls.

Models call :func:`attention` with ``(batch, tokens, heads, head_dim)`` tensors and name the
call site (``"self"``, ``"cross"``, ``"joint"`` or any name their USP adapter declares).  On a
single process the call goes to a kernel (PyTorch SDPA unless another registered kernel is
selected).  While a sequence-parallel runtime is active (``core.parallel``), it sees every call
first and routes the sites its adapter declared through the parallel engine.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "register_kernel",
    "selected_kernel_name",
    "available_kernels",
    "use_kernel",
    "sdpa",
    "AttentionRouter",
    "active_router",
    "routed",
]

Kernel = Callable[..., torch.Tensor]
"""``kernel(q, k, v, *, mask, scale) -> out`` on ``(B, H, L, D)`` tensors (SDPA layout)."""


from torch.nn.attention import SDPBackend, sdpa_kernel

CUDA_PRIORITY = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH)
"""SDPA backends on CUDA, fastest exact first. On an H200 (torch 2.11, bf16, head dim 128) cuDNN ran
the Wan and Qwen-Image attention shapes at ~575-583 TFLOP/s, flash at ~356-362 and the
memory-efficient kernel at ~177-183 (docs/PERFORMANCE.md), while PyTorch's own order tries flash
first. Each backend still declines shapes or dtypes it does not support, so the next one runs."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask=None, scale=None) -> torch.Tensor:
    """PyTorch SDPA; on CUDA with :data:`CUDA_PRIORITY` (cuDNN first), all of them exact."""
    if q.is_cuda:
        with sdpa_kernel(list(CUDA_PRIORITY), set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _one_backend(backend: SDPBackend) -> Kernel:
    def kernel(q, k, v, *, mask=None, scale=None):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    kernel.__name__ = f"sdpa_{backend.name.lower()}"
    return kernel


_KERNELS: dict[str, Kernel] = {
    "sdpa": sdpa,
    # one backend only, for measuring them against each other (``ditkit bench --attention``)
    "sdpa-cudnn": _one_backend(SDPBackend.CUDNN_ATTENTION),
    "sdpa-flash": _one_backend(SDPBackend.FLASH_ATTENTION),
    "sdpa-efficient": _one_backend(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa-math": _one_backend(SDPBackend.MATH),
}
_selected: str | None = None


def register_kernel(name: str, kernel: Kernel) -> None:
    """Make ``kernel`` selectable by ``name`` (``DITKIT_ATTENTION=name`` or :func:`use_kernel`)."""
    if not callable(kernel):
        raise TypeError(f"attention kernel {name!r} is not callable: {kernel!r}")
    _KERNELS[name] = kernel


def available_kernels() -> list[str]:
    return sorted(_KERNELS)


def selected_kernel_name() -> str:
    """The kernel :func:`attention` uses now: :func:`use_kernel`'s, else ``DITKIT_ATTENTION``, else ``sdpa``."""
    return _selected or os.environ.get("DITKIT_ATTENTION", "sdpa")


def _kernel() -> Kernel:
    name = selected_kernel_name()
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention kernel {name!r} (from DITKIT_ATTENTION or use_kernel); "
            f"available: {', '.join(available_kernels())}"
        ) from None


@contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Select a registered kernel for the calls made inside the block."""
    global _selected
    if name not in _KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; available: {', '.join(available_kernels())}")
    previous, _selected = _selected, name
    try:
        yield
    finally:
        _selected = previous


def local_attention(q, k, v, *, mask=None, scale=None) -> torch.Tensor:
    """Attention on this process only; ``(B, L, H, D)`` in and out."""
    out = _kernel()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=mask, scale=scale)
    return out.transpose(1, 2)


class AttentionRouter(Protocol):
    """What a sequence-parallel runtime implements to see attention calls first."""

    def __call__(self, q, k, v, *, site: str, mask, scale, **site_args) -> torch.Tensor | None:
        """Return the output for a call it handles, or ``None`` to let it run locally."""


_router: AttentionRouter | None = None
_routed_eager = None
"""``_routed_call`` wrapped in ``torch.compiler.disable``, made by the first :func:`routed` block:
the wrapper imports dynamo (a second of start-up), which a process that only lists plugins never needs."""


def active_router() -> AttentionRouter | None:
    return _router


@contextmanager
def routed(router: AttentionRouter) -> Iterator[None]:
    """Route every :func:`attention` call made inside the block through ``router`` first."""
    global _router, _routed_eager
    if _routed_eager is None:  # outside any compiled region: routed() runs in a component's pre-hook
        _routed_eager = torch.compiler.disable(_routed_call)
    previous, _router = _router, router
    try:
        yield
    finally:
        _router = previous


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    site: str = "self",
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    **site_args,
) -> torch.Tensor:
    """Scaled dot-product attention on ``(batch, tokens, heads, head_dim)`` tensors.

    ``site`` names the call site so a USP adapter can declare which sites run sequence-parallel
    (``"self"``: the token sequence attends to itself; ``"cross"``: queries attend to a context
    that every rank holds whole; ``"joint"``: a text+image sequence, with ``site_args`` saying how
    it is laid out). ``mask`` is a boolean or additive mask broadcastable to ``(B, H, Lq, Lk)``.
    Returns ``(batch, query_tokens, heads, head_dim)``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects (batch, tokens, heads, head_dim) tensors, got q{tuple(q.shape)} "
            f"k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if _router is not None:
        out = _routed_eager(_router, q, k, v, site, mask, scale, site_args)
        if out is not None:
            return out
    return local_attention(q, k, v, mask=mask, scale=scale)


def _routed_call(router, q, k, v, site, mask, scale, site_args):
    # Called through ``_routed_eager``: collectives (all-to-all, ring send/recv) and yunchang's merge
    # run eagerly; inside a compiled block this is a graph break, and the rest of the block stays compiled.
    return router(q, k, v, site=site, mask=mask, scale=scale, **site_args)
