"""enable_usp / router refusals that need no second rank (a fake 2-rank mesh, no process group)."""
import pytest
import torch
from torch import nn

from core.errors import ParallelError
from core.parallel import Mesh, SequenceState, UspRouter, enable_usp
from core.spec import SequenceGather, SequenceSplit, UspAdapter

from . import _toys


def _mesh(ulysses=2, ring=1):
    return Mesh(
        world_size=ulysses * ring, rank=0, ulysses_degree=ulysses, ring_degree=ring, cfg_degree=1,
        device=torch.device("cpu"), backend="gloo", sp_group=None, ulysses_group=None, ring_group=None, cfg_group=None,
    )


def _engine(q, k, v, scale):
    raise AssertionError("the engine must not run")


def test_unknown_submodule_is_named():
    adapter = _toys.DIT_ADAPTER.model_copy(update={"splits": [SequenceSplit(module="blocks.9.norm")]})
    with pytest.raises(ParallelError, match="blocks.9.norm"):
        enable_usp(_toys.ToyDiT(), adapter, _mesh(), engine=_engine)


def test_heads_not_divisible_by_ulysses_degree():
    adapter = _toys.DIT_ADAPTER.model_copy(update={"heads": 3})
    with pytest.raises(ParallelError, match=r"\[1\]"):
        enable_usp(_toys.ToyDiT(), adapter, _mesh(), engine=_engine)


def test_undeclared_site_is_refused():
    router = UspRouter(_toys.DIT_ADAPTER, _mesh(), SequenceState(2, 0), _engine)
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(ParallelError, match="'joint'"):
        router(q, q, q, site="joint", mask=None, scale=None)
    assert router(q, q, q, site="cross", mask=None, scale=None) is None  # local: runs on this rank


def test_site_before_any_split_is_refused():
    router = UspRouter(_toys.DIT_ADAPTER, _mesh(), SequenceState(2, 0), _engine)
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(ParallelError, match="not been split"):
        router(q, q, q, site="self", mask=None, scale=None)


def test_handle_removes_every_hook():
    model = _toys.ToyDiT()
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with enable_usp(model, _toys.DIT_ADAPTER, _mesh(ulysses=1), engine=_engine):
        pass
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == before


class _Pair(nn.Module):
    def forward(self, x, y=None):
        return (x, y)


def test_split_then_gather_on_one_rank_is_identity():
    """A 1-rank mesh runs the whole hook machinery (split, layout, gather) without collectives."""
    adapter = UspAdapter(
        component="pair", heads=4,
        splits=[SequenceSplit(module="", at="input", arg="y", dim=0), SequenceSplit(module="", at="input", arg=0)],
        gathers=[SequenceGather(module="", at="output", arg=0)],
        sites={},
    )
    x, y = torch.randn(2, 5, 3), torch.randn(5)
    with enable_usp(_Pair(), adapter, _mesh(ulysses=1), engine=_engine) as h:
        out = h.component(x, y)
        assert torch.equal(out[0], x) and torch.equal(out[1], y)
        assert h.component(x)[1] is None  # an optional input the call leaves out passes through
        with pytest.raises(ParallelError, match="5 tokens"):
            h.component(x, torch.randn(6))  # one sequence, two lengths


def test_a_gathered_sequence_may_be_split_again_with_another_length():
    """While split, every split of a sequence covers the same tokens; once gathered, the next split
    starts a new layout (a model splitting inside each sub-module, over streams of different lengths)."""
    state = SequenceState(2, 0)
    assert state.record("tokens", 19, "attn1").shard == 10
    with pytest.raises(ParallelError, match="until it is gathered"):
        state.record("tokens", 15, "attn2")
    state.gathered("tokens")
    assert state.record("tokens", 15, "attn2").shard == 8 and state.layout("tokens", "x").total == 15
    assert state.seen["tokens"] == {19, 15}


def test_an_inferred_site_before_any_split_runs_locally():
    """``infer`` needs no comparison while nothing is split: every rank holds the tensors whole."""
    from core.spec import AttentionSite

    adapter = _toys.DIT_ADAPTER.model_copy(update={"sites": {"dispatch": AttentionSite(strategy="infer")}})
    router = UspRouter(adapter, _mesh(), SequenceState(2, 0), _engine)
    q = torch.randn(1, 4, 4, 8)
    assert router(q, q, q, site="dispatch", mask=None, scale=None) is None
