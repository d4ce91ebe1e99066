"""The exact-padding technique on one process: padded keys get exactly zero weight."""
import pytest
import torch
import torch.nn.functional as F

from core.parallel import ShardLayout, shard_tensor
from core.parallel.engine import cpu_flash_lse
from core.parallel.keymask import HEAD_DIM_MULTIPLE, mask_padded_keys


def _reference(q, k, v, scale):
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)), scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("head_dim", [8, 12, 64])
def test_padded_keys_get_no_weight(dtype, tol, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    real, pads = 9, 5
    q, k, v = (torch.randn(2, real, 3, head_dim, generator=g) for _ in range(3))
    # padding rows the model computed as garbage, even huge or non-finite, must not leak
    garbage = torch.full((2, pads, 3, head_dim), 3e4)
    garbage[0, 0, 0, 0] = float("inf")
    garbage[1, 1, 1, 1] = float("nan")
    kp, vp = torch.cat([k, garbage], 1), torch.cat([v, garbage], 1)
    valid = torch.arange(real + pads) < real
    scale = head_dim**-0.5
    q2, k2, v2 = mask_padded_keys(q.to(dtype), kp.to(dtype), vp.to(dtype), valid)
    assert q2.shape[-1] % HEAD_DIM_MULTIPLE == 0 and q2.shape[-1] > head_dim
    out, lse = cpu_flash_lse(q2, k2, v2, softmax_scale=scale)
    want = _reference(q.to(dtype), k.to(dtype), v.to(dtype), scale)
    got = out[..., :head_dim].float()
    assert torch.isfinite(got).all()
    assert ((got - want).norm() / want.norm()).item() < tol
    # the log-sum-exp (what the ring merge weighs blocks by) is the one over real keys only
    want_lse = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale, dim=-1)
    assert torch.allclose(lse.double(), want_lse, atol=5e-2 if dtype != torch.float32 else 1e-5)


def test_all_padding_block_is_finite():
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    out, lse = cpu_flash_lse(*mask_padded_keys(q, k, v, torch.zeros(4, dtype=torch.bool)), softmax_scale=0.3)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (lse < -1e20).all()  # a block of pure padding weighs nothing in the ring merge


@pytest.mark.parametrize("total, world", [(8, 4), (7, 4), (5, 4), (3, 4), (1, 2), (253, 8)])
def test_shards_cover_the_sequence_once(total, world):
    x = torch.arange(total * 2, dtype=torch.float32).view(1, total, 2)
    layouts = [ShardLayout(total, world, r) for r in range(world)]
    parts = [shard_tensor(x, 1, lay) for lay in layouts]
    assert {p.shape[1] for p in parts} == {-(-total // world)}
    assert sum(lay.valid() for lay in layouts) == total
    assert torch.equal(torch.cat(parts, 1)[:, :total], x)
    for lay, p in zip(layouts, parts):
        assert not p[:, lay.valid():].any()  # zero padding
        assert lay.valid_mask().sum().item() == lay.valid()
