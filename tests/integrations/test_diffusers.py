"""core.integrations.diffusers: diffusers transformers unchanged, through core.attention and USP from their _cp_plan.

Tiny configs (random weights, fp32) of the nine diffusers 0.42 transformer classes that ship a
``_cp_plan`` (``_tiny.CASES``), and SD3 with a plan registered the way a third party would. One
2-rank job (gloo) carries every multi-process and compile assertion: each class on 2 ranks
(Ulysses, then ring) against one process on a split token count that leaves a remainder, and each
class compiled regionally against eager at three sizes.
"""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from core.contract import ContractDeprecationWarning
from core.errors import ParallelError, PluginError
from core.parallel import launch

from . import _tiny, _workers

di = pytest.importorskip("core.integrations.diffusers")

TOL = 1e-5
"""Relative error (fp32) for routed vs diffusers, USP vs one process and compiled vs eager: the
same arithmetic up to the order of floating-point sums (measured: <= 4e-7)."""


def test_importing_core_never_imports_diffusers():
    code = ("import sys, core, core.parallel, core.testing, core.integrations, core.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


INDUCTOR = ("Wan", "Flux")
"""Classes compiled with inductor (what ditkit runs; Flux has two block classes and joint
attention); the other seven with dynamo and the ``aot_eager`` backend. One graph per block class
and no recompilation are dynamo's doing, whatever the backend; nine cold inductor builds
(≈150 s of CPU) do not fit the suite's budget."""


@pytest.fixture(scope="module")
def bridge_job():
    """The suite's one 2-rank job for the bridge: USP of every class (and of SD3 through a registered
    plan) at Ulysses 2 and ring 2, the compile checks split across the two ranks (one inductor
    build each), and the router's inference and choice of path on hand-made layouts."""
    cases = [*_tiny.CASES, *_tiny.REGISTERED]
    compile_plan = [(n, "inductor") for n in INDUCTOR] + [(n, "aot_eager") for n in _tiny.CASES if n not in INDUCTOR]
    return launch(_workers.bridge_job, 2, args=(cases, [(2, 1), (1, 2)], compile_plan), timeout=600)


@contextmanager
def native_backend_forbidden():
    """diffusers' native backend raises inside the block: a routed forward must never reach it."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    def forbidden(**kwargs):
        raise AssertionError("an attention call reached diffusers' native backend")

    native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]
    _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE] = forbidden
    try:
        yield
    finally:
        _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE] = native


@pytest.fixture
def core_calls(monkeypatch):
    """How many attention products ran through core.attention."""
    import core.attention

    calls = []
    real = core.attention.local_attention
    monkeypatch.setattr(core.attention, "local_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _outputs(out) -> list[torch.Tensor]:
    return _workers._outputs(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_tiny.CASES))
def test_diffusers_class_routed_compiled_and_parallel(name, bridge_job, core_calls):
    """One diffusers class end to end: (1) routed through core.attention = diffusers' own forward
    (native backend), and no call reaches the native backend; (2) compiled regionally = eager at
    three sizes with one graph per block class from the first call, no recompilation; (3) 2 ranks =
    one process, Ulysses and ring, at a split token count that leaves a remainder."""
    case = _tiny.CASES[name]
    model, x = case.build(), case.inputs(0)
    with torch.no_grad():
        want = _outputs(model(**x))
        routed = di.route_attention(model)
        with native_backend_forbidden():
            got = _outputs(model(**x))
            with pytest.raises(AssertionError, match="native backend"):
                case.build()(**x)  # the guard holds: an unrouted copy does reach it
    assert set(routed.values()) == {di.DISPATCH_SITE}
    assert len(core_calls) >= len(routed)
    errors = [_workers.rel_err(g, w) for g, w in zip(got, want, strict=True)]
    assert max(errors) <= TOL, f"{name}: routed vs diffusers {errors}"

    compiled = bridge_job["compile"][name]
    assert "error" not in compiled, f"{name}: compile raised {compiled.get('error')}"
    assert compiled["backend"] == ("inductor" if name in INDUCTOR else "aot_eager")
    assert compiled["parts"] == sorted(case.blocks), compiled["parts"]
    assert compiled["graphs"] == {f"transformer:{b}": 1 for b in case.blocks}, compiled["graphs"]
    assert compiled["recompiled"] == "no", compiled["recompiled"]
    assert len(compiled["errors"]) == 3 and max(compiled["errors"]) <= TOL, compiled["errors"]

    _check_usp(name, bridge_job)


def _check_usp(name: str, job: dict) -> None:
    assert job["world"] == 2
    usp = job["usp"][name]
    for degree in ("u2r1", "u1r2"):
        assert isinstance(usp[degree], float), f"{name} {degree}: USP raised {usp[degree]}"
    assert usp["splits"] and all(rem for _, rem in usp["splits"]), \
        f"{name}: split lengths {usp['splits']} include one that divides evenly by 2; the case proves less"
    for degree in ("u2r1", "u1r2"):
        assert usp[degree] <= TOL, f"{name} {degree}: USP vs one process, relative error {usp[degree]:.3g}"


@pytest.mark.slow
def test_a_registered_plan_runs_a_class_without_one(bridge_job, monkeypatch):
    """SD3 ships no _cp_plan and its processor bypasses dispatch_attention_fn: refused, then run
    exactly on 2 ranks once a plan is registered (``_tiny.register_sd3_plan``)."""
    model = _tiny.sd3(dual=True)
    assert set(di.route_attention(model).values()) == {"JointAttnProcessor"}
    monkeypatch.setattr(di, "TRANSLATIONS", dict(di.TRANSLATIONS))
    with pytest.raises(ParallelError, match="declares no _cp_plan.*register_cp_translation"):
        di.usp_from_cp_plan(model)
    _tiny.register_sd3_plan()
    adapter = di.usp_from_cp_plan(model)
    assert [(s.module, s.arg) for s in adapter.splits] == [("transformer_blocks.0", "hidden_states")]
    assert {n: s.strategy for n, s in adapter.sites.items()} == {"joint": "joint", "self": "parallel"}
    _check_usp("SD3.5 (registered plan)", bridge_job)


@pytest.mark.slow
def test_router_infers_layouts_and_refuses_the_rest(bridge_job):
    """core.parallel.infer on hand-made tensors (2 ranks): whole, [whole prefix, shard] and a shard
    with nothing in front are told apart; a shard in front of whole tokens is refused, and so is a
    mask on split keys."""
    assert bridge_job["infer"] == {"whole": (False, 0), "shard": (True, 0), "joint": (True, 3),
                                   "short whole": (False, 0), "shard first": "ParallelError",
                                   "masked split keys": "ParallelError"}


@pytest.mark.slow
def test_router_runs_each_inferred_layout_on_its_path(bridge_job):
    """The router's choice after inferring (2 ranks, hand-made tensors): split queries and keys run
    on the USP engine (after a whole prefix, as a joint attention), whole queries all-gather the
    split keys, and whole keys run locally. Every path is exact, so the parity tests alone would
    pass a router that gathered the keys of every call."""
    assert bridge_job["router_paths"] == {"split q, split k": (("engine",), False),
                                          "joint": (("joint", "engine"), False),
                                          "whole q, split k": (("gathered keys",), False),
                                          "split q, whole k": ((), True)}


def test_set_attention_backend_names_ditkit(core_calls):
    """diffusers' own call selects the backend too (and makes it the process default, which is
    restored here)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    model, x = _tiny.wan(), _tiny.wan_inputs(0)
    previous = _AttentionBackendRegistry._active_backend
    try:
        model.set_attention_backend(di.BACKEND)
        with torch.no_grad(), native_backend_forbidden():
            model(**x)
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)
    assert len(core_calls) == 4  # 2 blocks × (self, cross)


def test_route_attention_refuses_an_uncovered_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = _tiny.wan()
    model.blocks[1].attn2.set_processor(AttnProcessor2_0())
    with pytest.raises(PluginError, match=r"blocks\.1\.attn2 \(AttnProcessor2_0\).*dispatch_attention_fn"):
        di.route_attention(model)


def _rules(adapter):
    return ({(s.module, s.at, s.arg, s.dim) for s in adapter.splits},
            {(g.module, g.arg, g.dim) for g in adapter.gathers})


BLOCKS = ("0", "1")  # every tiny model has 2 blocks of its ModuleList
EXPECTED = {
    "Flux": ({("", "input", "hidden_states", 1), ("", "input", "img_ids", 0)}, {("proj_out", None, 1)}),
    "Flux2": ({("", "input", "hidden_states", 1), ("", "input", "img_ids", 1)}, {("proj_out", None, 1)}),
    "QwenImage": ({("transformer_blocks.0", "input", "hidden_states", 1), ("pos_embed", "output", 0, 0),
                   *{(f"transformer_blocks.{b}", "input", "modulate_index", 1) for b in BLOCKS}}, {("proj_out", None, 1)}),
    "Wan": ({("rope", "output", 0, 1), ("rope", "output", 1, 1), ("blocks.0", "input", "hidden_states", 1),
             ("", "input", "timestep", 1)}, {("proj_out", None, 1)}),
    "ChronoEdit": ({("rope", "output", 0, 1), ("rope", "output", 1, 1), ("blocks.0", "input", "hidden_states", 1)},
                   {("proj_out", None, 1)}),
    # split and gathered inside each block; the plan lists gathers for 40 blocks, the tiny model has 2
    "Helios": ({*{(f"blocks.{b}.{m}", "input", "hidden_states", 1) for b in BLOCKS for m in ("attn1", "attn2", "ffn")},
                *{(f"blocks.{b}.attn1", "input", "rotary_emb", 1) for b in BLOCKS}},
               {(f"blocks.{b}.{m}", None, 1) for b in BLOCKS for m in ("attn1", "attn2", "ffn")}),
    # + the per-token timestep of the image-to-video pipelines (registered by the bridge)
    "LTXVideo": ({("", "input", "hidden_states", 1), ("rope", "output", 0, 1), ("rope", "output", 1, 1),
                  ("", "input", "timestep", 1)}, {("proj_out", None, 1)}),
    # + that and the audio-video rotary table the plan leaves out
    "LTX2Video": ({("", "input", "hidden_states", 1), ("rope", "output", 0, 1), ("rope", "output", 1, 1),
                   ("", "input", "timestep", 1), ("cross_attn_rope", "output", 0, 1), ("cross_attn_rope", "output", 1, 1)},
                  {("proj_out", None, 1)}),
    "MiniMaxH3": ({("rope", "output", 0, 0), ("rope", "output", 1, 0), ("transformer_blocks.0", "input", "hidden_states", 1),
                   ("norm_out", "input", "timestep_indices", 0),
                   *{(f"transformer_blocks.{b}", "input", "adaln_indices", 0) for b in BLOCKS}},
                  {("proj_out", None, 1), ("audio_proj_out", None, 1)}),
}
KEPT_WHOLE = {
    "Flux": {"['']['encoder_hidden_states']", "['']['txt_ids']"},
    "Flux2": {"['']['encoder_hidden_states']", "['']['txt_ids']"},
    "QwenImage": {"['transformer_blocks.0']['encoder_hidden_states']",
                  "['transformer_blocks.*']['encoder_hidden_states_mask']", "['pos_embed'][1]"},
    "LTXVideo": {"['']['encoder_hidden_states']", "['']['encoder_attention_mask']"},
    "LTX2Video": {"['']['encoder_hidden_states']", "['']['encoder_attention_mask']"},
}


@pytest.mark.parametrize("name", list(_tiny.CASES))
def test_plan_translation(name):
    """Every plan entry becomes its rule (a ``*`` one per block), the text entries stay whole, and
    every call through dispatch_attention_fn is the one inferred site."""
    with torch.device("meta"):
        model = _tiny.CASES[name].build()
    adapter = di.usp_from_cp_plan(model)
    assert _rules(adapter) == EXPECTED[name]
    assert {n: s.strategy for n, s in adapter.sites.items()} == {di.DISPATCH_SITE: "infer"}
    assert adapter.heads == _tiny.HEADS
    whole = {entry.split("_cp_plan")[1] for entry in di.cp_plan_text_entries(model)}
    assert whole == KEPT_WHOLE.get(name, set())
    wan = di.usp_from_cp_plan(_tiny.wan())
    assert {s.expected_dims for s in wan.splits if s.arg == "timestep"} == {2}  # (B,) timesteps stay whole


def test_a_configuration_computed_wrongly_on_a_shard_is_refused():
    from diffusers import HeliosTransformer3DModel

    with torch.device("meta"):
        model = HeliosTransformer3DModel(num_attention_heads=2, attention_head_dim=12, num_layers=1, rope_dim=(4, 4, 4),
                                         is_amplify_history=True)
    with pytest.raises(ParallelError, match="is_amplify_history=True.*shard"):
        di.usp_from_cp_plan(model)


def test_plan_entries_that_cannot_be_expressed_are_named(monkeypatch):
    from diffusers.models._modeling_parallel import ContextParallelInput as In

    model = _tiny.wan()
    plan = dict(type(model)._cp_plan)
    for bad, words in [({"rope": {0: [In(split_dim=1), In(split_dim=1)]}}, r"\['rope'\]\[0\].*list"),
                       ({"blocks.*.ffn.*": {"x": In(split_dim=1)}}, r"more than one '\*'"),
                       ({"nowhere": {"x": In(split_dim=1)}}, r"no submodule 'nowhere'"),
                       ({"blocks.*.nowhere": {"x": In(split_dim=1)}}, r"no submodule 'blocks\.0\.nowhere'"),
                       ({"rope": {"x": In(split_dim=1, split_output=True)}}, r"\['rope'\]\['x'\].*output index")]:
        monkeypatch.setattr(type(model), "_cp_plan", {**plan, **bad})
        with pytest.raises(ParallelError, match=words):
            di.usp_from_cp_plan(model)
    monkeypatch.setattr(type(model), "_cp_plan", None)
    with pytest.raises(ParallelError, match="declares no _cp_plan"):
        di.usp_from_cp_plan(model)


PARITY_MIRRORED = {
    "sd3": (_tiny.sd3, lambda: _tiny.sd3_inputs(0)),
    "sd3.5-dual": (lambda: _tiny.sd3(dual=True), lambda: _tiny.sd3_inputs(0)),
}


@pytest.mark.parametrize("name", list(PARITY_MIRRORED))
def test_mirrored_processor_equals_diffusers(name, core_calls):
    """SD3's processor bypasses dispatch_attention_fn, so ditkit mirrors it: same output (≈2e-7:
    ditkit joins [text, image] where diffusers joins [image, text])."""
    build, inputs = PARITY_MIRRORED[name]
    model, x = build(), inputs()
    with torch.no_grad():
        want = model(**x)[0]
        routed = di.route_attention(model)
        got = model(**x)[0]
    assert len(core_calls) >= len(routed)
    assert _workers.rel_err(got, want) <= 1e-6


def test_the_first_bridges_names_still_work(core_calls):
    """The mirrored processors of the first bridge are deprecated names of diffusers' own on ditkit's
    backend: one DeprecationWarning naming the replacement, and the same output."""
    with pytest.warns(ContractDeprecationWarning, match=r"FluxAttnProcessor is deprecated since contract 1.1; use .*route_attention"):
        flux_processor = di.FluxAttnProcessor
    with pytest.warns(DeprecationWarning, match="routed_processor is deprecated"):
        routed_processor = di.routed_processor
    model, x = _tiny.flux(), _tiny.flux_inputs(0)
    with torch.no_grad():
        want = model(**x)[0]
        model.set_attn_processor(flux_processor())
        with native_backend_forbidden():
            got = model(**x)[0]
    assert len(core_calls) == 3 and _workers.rel_err(got, want) == 0
    assert routed_processor(model.transformer_blocks[0].attn) is flux_processor
    for name in ("WanAttnProcessor", "QwenDoubleStreamAttnProcessor"):
        with pytest.warns(DeprecationWarning, match=name):
            assert hasattr(getattr(di, name)(), "_attention_backend")


def test_backend_takes_diffusers_arguments_as_the_native_one_does():
    """The backend function against diffusers' native one: a (batch, keys) mask, grouped-query
    heads; and what it does not run (dropout, causal) raises instead of being dropped."""
    from diffusers.models.attention_dispatch import _native_attention

    from core.integrations.diffusers import _ditkit_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 5, 4, 8, generator=g), torch.randn(2, 7, 2, 8, generator=g), torch.randn(2, 7, 2, 8, generator=g)
    mask = torch.rand(2, 7, generator=g) > 0.3
    mask[:, 0] = True
    got = _ditkit_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    want = _native_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert _workers.rel_err(got, want) <= 1e-6
    with pytest.raises(ValueError, match="enable_gqa"):
        _ditkit_attention(q, k, v)
    with pytest.raises(ValueError, match="dropout"):
        _ditkit_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="causal"):
        _ditkit_attention(q, q, q, is_causal=True)
