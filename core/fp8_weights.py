"""Linear weights stored in 8-bit floating point (opt-in, lossy): ``core.load(..., weight_dtype=...)``.

Every ``torch.nn.Linear`` of every component keeps its weight in ``float8_e4m3fn`` (or
``float8_e5m2``) and casts it to the compute dtype at each call, so the weights take half the
memory of bf16 (a quarter of fp32) while the matmuls run as before. Biases, norms, embeddings
and convolutions stay in the compute dtype. The cast is plain rounding to the nearest fp8 value,
with no per-tensor scale (as DiffSynth-Studio's fp8 storage does): weights beyond fp8's range
(±448 for e4m3) would not survive, and every weight loses precision (3 mantissa bits), so the
output differs from bf16. ``docs/PERFORMANCE.md`` has the measured error.

A pipeline loaded this way says so (``pipe.lossy``), and the conformance kit refuses it: its
checks prove exactness, which this storage gives up.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import InputError

__all__ = ["WEIGHT_DTYPES", "resolve_weight_dtype", "store_linear_weights", "Fp8Linear"]

WEIGHT_DTYPES = {
    "float8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2, "fp8_e5m2": torch.float8_e5m2,
}


def resolve_weight_dtype(weight_dtype) -> torch.dtype | None:
    """``None`` (weights in the compute dtype, the default) or one of :data:`WEIGHT_DTYPES`."""
    if weight_dtype is None:
        return None
    if isinstance(weight_dtype, torch.dtype) and weight_dtype in WEIGHT_DTYPES.values():
        return weight_dtype
    key = str(weight_dtype).removeprefix("torch.").lower()
    if key not in WEIGHT_DTYPES:
        raise InputError(f"unknown weight_dtype {weight_dtype!r}; use one of {', '.join(sorted(WEIGHT_DTYPES))} "
                         f"(or None: weights in the compute dtype)")
    return WEIGHT_DTYPES[key]


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored in fp8 and cast to ``compute_dtype`` when read.

    The stored parameter keeps its place and name (``_parameters["weight"]``: state dicts,
    checkpoints and the loader see it unchanged, in fp8); the attribute ``weight`` is the cast
    copy, so ``nn.Linear.forward`` runs in the compute dtype and model code that reads
    ``layer.weight.dtype`` to pick its input dtype keeps feeding it bf16, never fp8 activations."""

    compute_dtype: torch.dtype

    @property
    def weight(self) -> torch.Tensor:
        return self._parameters["weight"].to(self.compute_dtype)

    @weight.setter
    def weight(self, value) -> None:
        self._parameters["weight"] = value


def store_linear_weights(modules: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, int]:
    """Convert the weight of every plain ``nn.Linear`` in ``modules`` to ``dtype`` in place (the
    layer becomes an :class:`Fp8Linear`); returns the number of layers converted per component.

    Before a checkpoint is loaded this costs nothing (the weights are not filled yet) and the
    loader then casts the file's values straight into ``dtype``."""
    counts = {}
    for name, module in modules.items():
        n = 0
        for layer in module.modules():
            if type(layer) is not nn.Linear:
                continue
            old = layer.weight
            stored = nn.Parameter(old.detach().to(dtype), requires_grad=False)
            stored.__dict__.update(old.__dict__)  # a parameter still to be allocated stays so
            layer.__class__ = Fp8Linear
            layer.compute_dtype = old.dtype
            layer._parameters["weight"] = stored
            n += 1
        counts[name] = n
    return counts
