"""Masking padded keys inside any attention kernel, exactly, by widening the head dimension.

The USP engine (Ulysses all-to-all, ring with log-sum-exp merging) takes no mask, and its keys
travel between ranks.  So the mask travels *with the keys*: every head gets extra features,
``q = 1`` and ``k = 0`` for a real key, ``k = NEG`` for a padded one, ``v = 0``.  The extra
features add exactly ``0`` to a real score and ``NEG`` (≈ -1e30 after scaling) to a padded one,
whose ``exp`` underflows to exactly ``0`` in every kernel: padded keys get no weight at all,
through Ulysses and through the ring's log-sum-exp merge, whichever rank they land on.
The head dimension is rounded up to a multiple of 8 (what cuDNN / flash kernels accept), the
softmax scale of the *original* head dimension is passed explicitly, and the extra output
features are cut off afterwards.  Padded rows of ``k`` and ``v`` are zeroed so that whatever
the model computed for padding (even inf/NaN) cannot leak in as ``0 · inf``.
"""
from __future__ import annotations

import torch

__all__ = ["mask_padded_keys", "neg_for", "HEAD_DIM_MULTIPLE"]

HEAD_DIM_MULTIPLE = 8


def neg_for(dtype: torch.dtype) -> float:
    """A key feature that makes a score hugely negative yet finite in ``dtype``."""
    if dtype == torch.float16:
        # fp16 tops out at 65504; -3e4 · scale is still below exp's underflow (≈ -104 in fp32).
        return -3.0e4
    return -1.0e30


def mask_padded_keys(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Widen ``(B, L, H, D)`` q/k/v so that keys where ``key_valid`` (``(L,)`` bool) is False get no weight.

    Returns the widened tensors; the caller passes ``scale = D ** -0.5`` (or the model's own) to
    the kernel and keeps ``out[..., :D]``.
    """
    b, length, h, d = k.shape
    width = -(-(d + 1) // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE - d
    valid = key_valid.to(device=k.device).view(1, length, 1, 1)

    q_extra = q.new_zeros(q.shape[:-1] + (width,))
    q_extra[..., 0] = 1
    k_extra = k.new_zeros(k.shape[:-1] + (width,))
    k_extra[..., 0] = torch.where(valid[..., 0], 0.0, neg_for(k.dtype)).to(k.dtype)
    zero = k.new_zeros(())
    k = torch.where(valid, k, zero)
    v = torch.where(valid, v, zero)
    v_extra = v.new_zeros(v.shape[:-1] + (width,))
    return (
        torch.cat([q, q_extra], dim=-1),
        torch.cat([k, k_extra], dim=-1),
        torch.cat([v, v_extra], dim=-1),
    )
