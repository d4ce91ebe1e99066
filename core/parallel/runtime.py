"""Turning USP on for one pipeline component: hooks, attention routing, and their removal."""
from __future__ import annotations

import contextlib
from torch import nn

from core.attention import routed
from core.errors import ParallelError
from core.spec import UspAdapter

from .engine import UspEngine, make_engine
from .hooks import install_sequence_hooks
from .mesh import Mesh
from .router import UspRouter
from .shards import SequenceState

__all__ = ["UspHandle", "enable_usp"]


class UspHandle:
    """What :func:`enable_usp` installed; ``remove()`` (or leaving the ``with`` block) undoes it."""

    def __init__(self, component: nn.Module, adapter: UspAdapter, mesh: Mesh, engine: UspEngine):
        self.component, self.adapter, self.mesh, self.engine = component, adapter, mesh, engine
        self.state = SequenceState(mesh.sp_degree, mesh.sp_rank)
        self.router = UspRouter(adapter, mesh, self.state, engine)
        self._routing: list[contextlib.ExitStack] = []
        self._handles = [
            component.register_forward_pre_hook(self._enter, prepend=True),
            component.register_forward_hook(self._exit, always_call=True),
        ]
        try:
            self._handles += install_sequence_hooks(
                component, adapter.component, adapter.splits, adapter.gathers, mesh, self.state
            )
        except BaseException:
            self.remove()
            raise

    def _enter(self, module, args):
        if not self._routing:  # a re-entrant call keeps the outer pass's layouts
            self.state.reset()
        stack = contextlib.ExitStack()
        stack.enter_context(routed(self.router))
        self._routing.append(stack)

    def _exit(self, module, args, output):
        if self._routing:
            self._routing.pop().close()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        while self._routing:
            self._routing.pop().close()

    def __enter__(self) -> "UspHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def enable_usp(
    component: nn.Module,
    adapter: UspAdapter,
    mesh: Mesh,
    *,
    heads: int | None = None,
    engine: UspEngine | None = None,
) -> UspHandle:
    """Run ``component`` sequence-parallel on ``mesh`` as ``adapter`` declares, until removed.

    Every forward of ``component`` then splits the declared sequences, routes its
    ``core.attention`` calls per ``adapter.sites`` and gathers the sequences back, so its output
    equals the single-process one. ``heads`` overrides ``adapter.heads`` (pass the resolved
    value when the adapter names a config key; see :func:`core.parallel.component_heads`).
    """
    if heads is None and isinstance(adapter.heads, int):
        heads = adapter.heads
    if heads is not None and heads % mesh.ulysses_degree:
        from .mesh import valid_ulysses_degrees

        raise ParallelError(
            f"{adapter.component!r} has {heads} attention heads, which Ulysses degree {mesh.ulysses_degree} "
            f"does not divide; valid Ulysses degrees: {valid_ulysses_degrees(mesh.sp_degree, heads)}"
        )
    return UspHandle(component, adapter, mesh, engine or make_engine(mesh))
