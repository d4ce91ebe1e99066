"""The key-set fingerprint the docs publish for every official checkpoint layout (docs/models.md,
"Key-set fingerprints"): for each tensor the strings ``name:s0_s1_...`` (its shape joined by
``_``) and ``name``; all sorted, joined with ``,``; the MD5 hex digest. One implementation for
every test that compares a model's key set with a published one."""
from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import torch


def fingerprint(state: Mapping[str, torch.Tensor | Sequence[int]]) -> str:
    """The fingerprint of a state dict, or of a ``{name: shape}`` mapping."""
    parts = []
    for name, value in state.items():
        shape = value.shape if isinstance(value, torch.Tensor) else value
        parts += [f"{name}:{'_'.join(map(str, shape))}", name]
    return hashlib.md5(",".join(sorted(parts)).encode()).hexdigest()
