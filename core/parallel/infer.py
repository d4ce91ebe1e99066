"""Which part of an attention input is this rank's shard: worked out by comparing the ranks.

A model that does not name its attention call sites (one attention function for self-, cross-
and joint attention alike, as in diffusers' processors) still hands the router tensors of a
known kind. Under USP every token sequence is either *split* (each rank holds its own padded shard of
``shard`` tokens: different tokens on every rank) or *whole* (every rank holds all of it, the same
bytes: the text, an audio stream a plan does not split, and every stream before the first split
or after the last gather). The router's ``infer`` strategy asks, for the queries and the keys of
each call, which of the supported layouts holds:

- ``whole``: the tensor is the same on every rank;
- ``split`` with ``prefix`` ``P``: its last ``shard`` tokens differ between ranks (this rank's
  shard) and its first ``P`` tokens are the same on every rank (``P = 0``: the split sequence
  alone; ``P > 0``: a whole stream joined in front of it, a joint ``[text, image]`` attention).

Anything else (a split part in the middle or at the front, or tokens that are neither) is a
:class:`core.errors.ParallelError`, never a guess. The comparison is one all-gather of a few
float64 sums per tensor (sum, sum of squares, position-weighted sum), compared with a relative
tolerance of 1e-6: whole tensors are identical on every rank by construction (the router
all-gathers what it computes for them), while the shards of different tokens differ in their
leading digits. Only shards whose tokens are identical on every rank, positions included, would
be taken for whole: the fingerprint is computed after the model's rotary embedding, so that
needs a constant input without positional information.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.errors import ParallelError

__all__ = ["Layout", "infer_layouts", "SAME_RTOL"]

SAME_RTOL = 1e-6
"""Fingerprints within this relative distance count as the same tensor on every rank."""


@dataclass(frozen=True)
class Layout:
    """Where this rank's shard sits in one attention input: nowhere (``split=False``) or after
    ``prefix`` whole tokens."""

    split: bool
    prefix: int = 0


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    x = t.detach().to(torch.float64)
    if x.shape[1] == 0:
        return x.new_zeros(3)
    position = torch.arange(1, x.shape[1] + 1, dtype=torch.float64, device=x.device).view(1, -1, *([1] * (x.dim() - 2)))
    return torch.stack([x.sum(), x.square().sum(), (x * position).sum()])


def _parts(t: torch.Tensor, shard: int) -> torch.Tensor:
    """Fingerprints of (the whole tensor, its first ``len - shard`` tokens, its last ``shard`` tokens)."""
    length = t.shape[1]
    if length < shard:  # too short to hold a shard: only the whole tensor is compared
        whole = _fingerprint(t)
        return torch.stack([whole, whole, whole])
    return torch.stack([_fingerprint(t), _fingerprint(t[:, : length - shard]), _fingerprint(t[:, length - shard :])])


def _same(prints: torch.Tensor) -> bool:
    """``prints``: ``(world, 3)``: True if every rank's fingerprint equals rank 0's."""
    ref = prints[0]
    scale = prints.abs().amax(dim=0).clamp_min(1e-300)
    return bool(((prints - ref).abs() <= SAME_RTOL * scale).all())


def infer_layouts(tensors: dict[str, torch.Tensor], shard: int, group, where: str) -> dict[str, Layout]:
    """The :class:`Layout` of each ``(batch, tokens, ...)`` tensor in ``tensors`` (``{"q": q, "k": k}``),
    where the split sequence has ``shard`` tokens per rank; one all-gather over ``group`` for all of them.
    Every rank returns the same answer (they decide on the same gathered numbers)."""
    names = list(tensors)
    mine = torch.stack([_parts(tensors[n], shard) for n in names])  # (n, 3 parts, 3 sums)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine.contiguous(), group=group)
    prints = torch.stack(gathered)  # (world, n, 3 parts, 3 sums)
    out = {}
    for i, name in enumerate(names):
        length = tensors[name].shape[1]
        whole, head, tail = (prints[:, i, j] for j in range(3))
        if _same(whole):
            out[name] = Layout(split=False)
        elif length >= shard and not _same(tail) and (length == shard or _same(head)):
            out[name] = Layout(split=True, prefix=length - shard)
        else:
            raise ParallelError(
                f"{where}: {name} ({length} tokens) is neither the same on every rank nor "
                f"[tokens the same on every rank, then this rank's shard of {shard} tokens]; "
                f"a split part elsewhere in an attention input cannot be inferred (name the call site instead)"
            )
    return out
