"""How one token sequence is cut into equal, padded shards and put back together.

Every rank holds ``shard = ceil(total / world)`` tokens of a split sequence: rank ``i`` the
tokens ``[i·shard, (i+1)·shard)``, zero-padded at the end when the sequence runs out. Equal
shards are what the Ulysses all-to-all and the ring exchange need; the padding is never seen
as a key (:mod:`core.parallel.keymask`) and is cut off again when the sequence is gathered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.errors import ParallelError

__all__ = ["ShardLayout", "SequenceState", "shard_tensor", "gather_tensor"]


@dataclass(frozen=True)
class ShardLayout:
    """Where the ``total`` tokens of a sequence live across ``world`` ranks; ``rank`` is this one."""

    total: int
    world: int
    rank: int

    @property
    def shard(self) -> int:
        """Tokens every rank holds, padding included."""
        return -(-self.total // self.world)

    @property
    def padded(self) -> bool:
        return self.shard * self.world != self.total

    def valid(self, rank: int | None = None) -> int:
        """Real (non-padding) tokens on ``rank`` (this rank by default)."""
        r = self.rank if rank is None else rank
        return max(0, min(self.shard, self.total - r * self.shard))

    def describe(self) -> dict:
        """The split as numbers: full length, per-rank real tokens, shard size, pad tokens."""
        return {"total": self.total, "world": self.world, "shard": self.shard,
                "per_rank": [self.valid(r) for r in range(self.world)], "remainder": self.total % self.world,
                "pad": self.shard * self.world - self.total}

    def valid_mask(self, device=None) -> torch.Tensor:
        """``(shard,)`` bool: which of this rank's positions hold real tokens."""
        return torch.arange(self.shard, device=device) < self.valid()


def shard_tensor(t: torch.Tensor, dim: int, layout: ShardLayout) -> torch.Tensor:
    """This rank's shard of ``t`` (full length ``layout.total`` along ``dim``), zero-padded."""
    dim = dim % t.dim()
    start = layout.rank * layout.shard
    piece = t.narrow(dim, min(start, layout.total), layout.valid())
    missing = layout.shard - piece.shape[dim]
    if missing:
        pad = [0, 0] * (t.dim() - 1 - dim) + [0, missing]
        piece = F.pad(piece, pad)
    # Always a fresh tensor, never a view of ``t``: compiled blocks guard on whether an input is a
    # view, and the next block's input (the previous block's output) is not one.
    return piece.clone(memory_format=torch.contiguous_format)


def gather_tensor(t: torch.Tensor, dim: int, layout: ShardLayout, group) -> torch.Tensor:
    """The full sequence from every rank's shard ``t`` (padding removed); same bytes on every rank."""
    dim = dim % t.dim()
    t = t.contiguous()
    if layout.world == 1:
        return t.narrow(dim, 0, layout.total)
    parts = [torch.empty_like(t) for _ in range(layout.world)]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, layout.total)


class SequenceState:
    """The layouts of the sequences split during one forward pass of a component.

    The first split of a sequence fixes its layout; every later split of the same sequence in
    that pass must see the same total length (rotary tables, per-token modulation), which is
    what keeps them on the same token ranges. Once the sequence has been gathered, a later split
    with another length starts a new layout (a model that splits inside each sub-module and
    gathers right after, on streams of different lengths: a self-attention over history and
    current tokens, then a cross-attention over the current ones only).
    """

    def __init__(self, world: int, rank: int):
        self.world, self.rank = world, rank
        self._layouts: dict[str, ShardLayout] = {}
        self._gathered: set[str] = set()
        self.seen: dict[str, set[int]] = {}
        """Every total length each sequence was split at, across passes (what ran, for reports)."""

    def reset(self) -> None:
        self._layouts.clear()
        self._gathered.clear()

    def record(self, sequence: str, total: int, where: str) -> ShardLayout:
        layout = self._layouts.get(sequence)
        if layout is None or (layout.total != total and sequence in self._gathered):
            layout = self._layouts[sequence] = ShardLayout(total, self.world, self.rank)
            self.seen.setdefault(sequence, set()).add(total)
        elif layout.total != total:
            raise ParallelError(
                f"{where}: sequence {sequence!r} has {total} tokens here but {layout.total} where it was "
                f"first split; every split of one sequence must cover the same tokens until it is gathered"
            )
        self._gathered.discard(sequence)
        return layout

    def gathered(self, sequence: str) -> None:
        """Note that ``sequence`` was gathered whole: its next split may have another length."""
        self._gathered.add(sequence)

    def layout(self, sequence: str, where: str) -> ShardLayout:
        try:
            return self._layouts[sequence]
        except KeyError:
            raise ParallelError(
                f"{where}: sequence {sequence!r} has not been split yet in this forward pass "
                f"(split so far: {sorted(self._layouts) or 'none'})"
            ) from None

    def __contains__(self, sequence: str) -> bool:
        return sequence in self._layouts
