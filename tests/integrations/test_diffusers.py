"""core.integrations.diffusers: diffusers transformers unchanged, through core.attention and USP from their _cp_plan.

Tiny configs of diffusers' own Flux, Wan, Qwen-Image and SD3 transformers (random weights). The
multi-rank tests use image-token counts (15) and text lengths (7, 6) that leave a remainder on 2
and 4 ranks.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from core.errors import ParallelError, PluginError
from core.parallel import launch

from . import _tiny, _workers

di = pytest.importorskip("core.integrations.diffusers")


def rel_err(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_importing_core_never_imports_diffusers():
    code = ("import sys, core, core.parallel, core.testing, core.integrations, core.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


PARITY = {
    "flux": (_tiny.flux, lambda: _tiny.flux_inputs(3, 5), {"FluxAttnProcessor": 3}),
    "wan": (_tiny.wan, lambda: _tiny.wan_inputs(1, 3, 5), {"WanAttnProcessor": 4}),
    "wan-i2v": (_tiny.wan_i2v, lambda: _tiny.wan_i2v_inputs(1, 3, 5), {"WanAttnProcessor": 2}),
    "qwen": (_tiny.qwen, lambda: _tiny.qwen_inputs(3, 5), {"QwenDoubleStreamAttnProcessor": 2}),
    "sd3": (_tiny.sd3, lambda: _tiny.sd3_inputs(3, 5), {"JointAttnProcessor": 2}),
    "sd3.5-dual": (lambda: _tiny.sd3(dual=True), lambda: _tiny.sd3_inputs(3, 5), {"JointAttnProcessor": 3}),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_routed_processors_equal_diffusers(name, monkeypatch):
    """Same output as diffusers' own processors (fp32, no USP), and every call goes through core.attention."""
    import core.attention

    build, inputs, expected = PARITY[name]
    model, x = build(), inputs()
    with torch.no_grad():
        want = model(**x)[0]
        routed = di.route_attention(model)
        sites = []
        real = core.attention.local_attention
        monkeypatch.setattr(core.attention, "local_attention", lambda *a, **k: sites.append(1) or real(*a, **k))
        got = model(**x)[0]
    assert {c: list(routed.values()).count(c) for c in set(routed.values())} == expected
    assert len(sites) >= sum(expected.values())
    assert rel_err(got, want) <= 1e-6


def test_route_attention_refuses_an_uncovered_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = _tiny.wan()
    model.blocks[1].attn2.set_processor(AttnProcessor2_0())
    with pytest.raises(PluginError, match=r"blocks\.1\.attn2 \(AttnProcessor2_0\)"):
        di.route_attention(model)


def test_plan_translation():
    """Flux's plan splits text and image; the adapter keeps the text whole and splits the image."""
    flux = _tiny.flux()
    adapter = di.usp_from_cp_plan(flux)
    assert {(s.module, s.at, s.arg, s.dim) for s in adapter.splits} == {("", "input", "hidden_states", 1),
                                                                          ("", "input", "img_ids", 0)}
    assert [(g.module, g.dim) for g in adapter.gathers] == [("proj_out", 1)]
    assert adapter.sites["joint"].strategy == "joint" and adapter.heads == _tiny.HEADS
    assert di.cp_plan_text_entries(flux) == ["FluxTransformer2DModel._cp_plan['']['encoder_hidden_states']",
                                             "FluxTransformer2DModel._cp_plan['']['txt_ids']"]
    qwen = di.usp_from_cp_plan(_tiny.qwen())  # 'transformer_blocks.*' becomes one split per block
    assert sorted(s.module for s in qwen.splits if s.arg == "modulate_index") == ["transformer_blocks.0", "transformer_blocks.1"]
    assert [(s.module, s.arg) for s in qwen.splits if s.at == "output"] == [("pos_embed", 0)]
    wan = di.usp_from_cp_plan(_tiny.wan())
    assert {s.expected_dims for s in wan.splits if s.arg == "timestep"} == {2}  # (B,) timesteps stay whole


def test_plan_entries_that_cannot_be_expressed_are_named(monkeypatch):
    from diffusers.models._modeling_parallel import ContextParallelInput as In

    model = _tiny.wan()
    plan = dict(type(model)._cp_plan)
    for bad, words in [({"rope": {0: [In(split_dim=1), In(split_dim=1)]}}, r"\['rope'\]\[0\].*list"),
                       ({"blocks.*.ffn.*": {"x": In(split_dim=1)}}, r"more than one '\*'"),
                       ({"nowhere": {"x": In(split_dim=1)}}, r"no submodule 'nowhere'"),
                       ({"rope": {"x": In(split_dim=1, split_output=True)}}, r"\['rope'\]\['x'\].*output index")]:
        monkeypatch.setattr(type(model), "_cp_plan", {**plan, **bad})
        with pytest.raises(ParallelError, match=words):
            di.usp_from_cp_plan(model)
    monkeypatch.setattr(type(model), "_cp_plan", None)
    with pytest.raises(ParallelError, match="declares no _cp_plan"):
        di.usp_from_cp_plan(model)


def _check(results: dict, cases, degrees, world: int) -> None:
    assert results["world"] == world
    for name in cases:
        total, remainder = results[f"{name} image tokens"]
        assert remainder != 0, f"{name}: {total} image tokens divide evenly by {world}; the case proves nothing"
        for u, r in degrees:
            err = results[f"{name} u{u}r{r}"]
            assert err <= 1e-5, f"{name} Ulysses {u} x ring {r}: relative error {err:.3g}"


@pytest.mark.slow
def test_usp_two_ranks_equals_one_process_and_compile_equals_eager():
    """Flux (text 7, split in diffusers' plan, replicated here), Wan (both timestep layouts) and
    Qwen-Image on 2 ranks, Ulysses and ring, 15 image tokens. In the same job (one process
    start-up) rank 0 compiles Wan and rank 1 Qwen-Image: compiled == eager at three sizes, one
    graph per block class, no recompilation after the first size."""
    cases, degrees = list(_workers.CASES), [(2, 1), (1, 2)]
    results = launch(_workers.two_ranks, 2, args=(cases, degrees, ["wan", "qwen"]), timeout=300)
    _check(results, cases, degrees, 2)
    blocks = {"wan": "WanTransformerBlock", "qwen": "QwenImageTransformerBlock"}
    for name, got in results["compile"].items():
        assert got["parts"] == [("regional", blocks[name], 2)], got["parts"]
        assert got["recompiled"] == "no", f"{name}: {got['recompiled']}"
        assert got["graphs"] == {f"transformer:{blocks[name]}": 1}, got["graphs"]
        assert len(got["errors"]) == 3 and max(got["errors"]) <= 1e-5, f"{name}: compiled vs eager {got['errors']}"
    assert set(results["compile"]) == {"wan", "qwen"}


@pytest.mark.slow
def test_usp_four_ranks_equals_one_process():
    """Ulysses 2 × ring 2: 15 image tokens (remainder 3), Flux's 7 and Qwen-Image's 6 text tokens."""
    cases, degrees = ["flux", "wan", "qwen"], [(2, 2)]
    _check(launch(_workers.run, 4, args=(cases, degrees), timeout=240), cases, degrees, 4)
