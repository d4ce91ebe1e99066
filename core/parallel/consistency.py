"""Checks that the ranks of one run still agree (same noise, same inputs)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from core.errors import ParallelError

__all__ = ["checksum", "assert_same_on_ranks"]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(t: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum of the tensor's bits (int64, on its device): any bit flip changes it."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    bits = flat.view(_INT_VIEW[flat.element_size()]).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) % 1_000_003 + 1
    shape = torch.tensor(list(t.shape), dtype=torch.int64, device=bits.device)
    return torch.stack([(bits * weights).sum(), bits.sum(), shape.sum() * 1_000_003 + bits.numel()])


def assert_same_on_ranks(t: torch.Tensor, group=None, what: str = "noise") -> None:
    """Raise :class:`ParallelError` ("ranks diverged") unless ``t`` is bit-identical on every rank of ``group``.

    Costs one all-gather of three integers. Call it on the initial noise (and on anything else
    every rank must share) right after it is drawn.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    mine = checksum(t)
    if dist.get_backend(group) == "nccl" and mine.device.type != "cuda":
        mine = mine.cuda()
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    differ = [i for i, p in enumerate(parts) if not torch.equal(p, parts[0])]
    if differ:
        raise ParallelError(
            f"ranks diverged: {what} of shape {tuple(t.shape)} differs from group rank 0 on group rank(s) "
            f"{differ}; every rank must draw it from the same seed and device"
        )
