"""CFG parallel: the conditional branch on one half of the ranks, the unconditional on the other."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .mesh import Mesh

__all__ = ["cfg_parallel"]


def cfg_parallel(
    mesh: Mesh, cond: Callable[[], torch.Tensor], uncond: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(cond(), uncond())`` on every rank, each computed on one CFG half only.

    Without CFG parallel (``mesh.cfg_degree == 1``) both run here, one after the other. The two
    results must have the same shape and dtype (as a model's noise predictions do).
    """
    if mesh.cfg_degree == 1:
        return cond(), uncond()
    mine = (cond if mesh.cfg_rank == 0 else uncond)().contiguous()
    parts = [torch.empty_like(mine) for _ in range(mesh.cfg_degree)]
    dist.all_gather(parts, mine, group=mesh.cfg_group)
    return parts[0], parts[1]
