"""compile_pipeline on the example plugin: report, parity with eager, no recompilation."""
import pytest
import torch

import core
from core.errors import CompileError
from core.testing.checks import rel_error

pytestmark = pytest.mark.slow
ARGS = dict(num_inference_steps=3, seed=5, guidance_scale=3.0, progress=False)


@pytest.fixture(scope="module")
def pipes(example_site):
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(example_site))
        mp.setenv("DITKIT_STRICT_PLUGINS", "1")
        mp.setattr(core.registry, "_registry", None)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        eager = core.load("example-dit")
        compiled = core.load("example-dit")
        report = compiled.compile_pipeline()
        first = compiled("a red fox", **ARGS).images
        yield eager, compiled, report, first


def test_report_lists_regional_blocks_and_the_vae_method(pipes):
    _, _, report, _ = pipes
    parts = {(p.component, p.how, p.target): p.instances for p in report.parts}
    assert parts == {("dit", "regional", "JointBlock"): 2, ("dit", "regional", "SingleBlock"): 2,
                     ("vae", "method", "TinyDecoder.decode"): 1}
    assert "JointBlock" in str(report) and "instances" in str(report)


def test_one_graph_per_block_class_shared_by_all_instances(pipes):
    # two block classes + the VAE decode method: three graphs for four block instances, counted
    # from the first call (a second instance recompiling would add one)
    _, _, report, _ = pipes
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    assert report.graphs() == {"dit:JointBlock": 1, "dit:SingleBlock": 1, "vae:TinyDecoder.decode": 1}


def test_compiled_output_equals_eager(pipes):
    eager, _, _, first = pipes
    ref = eager("a red fox", **ARGS).images
    rel = rel_error(first, ref)
    assert rel <= 1e-5, rel  # fp32: inductor reorders reductions, nothing more


def test_no_recompilation_across_steps_cfg_and_resolutions(pipes):
    _, compiled, _, _ = pipes
    with torch.compiler.set_stance("fail_on_recompile"):
        for height, width, scale in [(64, 64, 1.0), (32, 48, 3.0), (48, 80, 1.0), (96, 32, 3.0)]:
            out = compiled("a dog", num_inference_steps=2, seed=1, height=height, width=width, guidance_scale=scale, progress=False)
            assert out.images.shape == (1, 3, height, width)


def test_offload_moving_the_weights_every_call_recompiles_nothing(pipes):
    """Block and model offload give every block (every component) fresh parameter memory at each
    call (core.offload); the compiled regions see the same guards: same graphs, same output. Under
    model offload the VAE loads once per generation: its compiled ``decode`` runs inside the
    VAE's unit (hooks on its submodules are inside the compiled region and never run)."""
    from core import offload

    _, compiled, report, _ = pipes
    reference = compiled("a red fox", **ARGS).images
    for mode in ("block", "model"):
        off = offload.apply(compiled, mode, "cpu")
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                out = compiled("a red fox", **ARGS).images
                compiled("a dog", num_inference_steps=1, seed=1, height=48, width=80, guidance_scale=1.0, progress=False)
            assert torch.equal(out, reference), mode
            loads = {u.name: u.loads for u in off.units}
            if mode == "model":
                assert loads == {"text_encoder": 2, "dit": 2, "vae": 2}, loads
            else:
                assert len(loads) == 4 and all(n > 0 for n in loads.values()), loads
        finally:
            offload.remove(compiled)
    assert report.graphs() == {"dit:JointBlock": 1, "dit:SingleBlock": 1, "vae:TinyDecoder.decode": 1}


def test_unknown_component_lists_the_compilable_ones(pipes):
    eager, *_ = pipes
    with pytest.raises(CompileError, match="'dit', 'vae'"):
        eager.compile_pipeline(compile_models=["text_encoder"])


def test_vae_method_compile_is_what_the_pipeline_calls(pipes):
    _, compiled, _, _ = pipes
    assert "decode" in compiled.vae.__dict__  # the bound compiled method shadows the class method


def test_repeated_blocks_class_attribute_is_honoured_and_a_misnamed_block_fails():
    from core.compile import compile_components

    class Block(torch.nn.Linear):
        pass

    class Model(torch.nn.Module):
        _repeated_blocks = ("Block",)

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Block(4, 4) for _ in range(3))

    report = compile_components({"m": Model()}, repeated_blocks={}, methods={}, options={"dynamic": True})
    assert [(p.how, p.target, p.instances) for p in report.parts] == [("regional", "Block", 3)]
    with pytest.raises(CompileError, match="Blok"):
        compile_components({"m": Model()}, repeated_blocks={"m": ["Blok"]}, methods={}, options={})


def _two_classes_named_block():
    def make(sign):
        class Block(torch.nn.Module):
            def forward(self, x):
                return x * sign
        return Block

    pos, neg = make(2.0), make(-1.0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.ModuleList([pos(), pos()])
            self.b = torch.nn.ModuleList([neg()])

        def forward(self, x):
            for m in [*self.a, *self.b]:
                x = m(x)
            return x

    return Model()


def test_two_distinct_classes_sharing_a_block_name_are_a_compile_error_naming_both():
    from core.compile import compile_components

    model = _two_classes_named_block()
    eager = model(torch.ones(2))
    assert torch.equal(eager, torch.full((2,), -4.0))
    with pytest.raises(CompileError, match=r"2 distinct classes.*a\.0, a\.1.*b\.0"):
        compile_components({"m": model}, repeated_blocks={"m": ["Block"]}, methods={}, options={"backend": "eager"})
    assert torch.equal(model(torch.ones(2)), eager)  # nothing was bound


def test_blocks_are_matched_by_class_object_not_by_name():
    from core.compile import compile_components

    class Block(torch.nn.Module):
        def forward(self, x):
            return x + 1

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.other = torch.nn.Identity()

    model = Wrapper()
    report = compile_components({"m": model}, repeated_blocks={"m": ["Block"]}, methods={}, options={"backend": "eager"})
    assert report.parts[0].instances == 2 and all("forward" in b.__dict__ for b in model.blocks)
    assert "forward" not in model.other.__dict__


def test_compiled_kernels_go_to_a_persistent_cache_keyed_by_torch_version(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from core.compile import compile_components

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("DITKIT_COMPILE_CACHE", str(tmp_path))
    report = compile_components({"m": torch.nn.Linear(4, 4)}, repeated_blocks={}, methods={}, options={"backend": "eager"})
    expected = tmp_path / "inductor" / f"torch-{torch.__version__}"
    assert report.cache_dir == str(expected) and cache_dir() == str(expected) and expected.is_dir()
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # inductor writes its default into the variable when it first looks; that is not a user's choice
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert compile_components({"m": torch.nn.Linear(4, 4)}, repeated_blocks={}, methods={},
                              options={"backend": "eager"}).cache_dir == str(expected)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice wins
    assert compile_components({"m": torch.nn.Linear(4, 4)}, repeated_blocks={}, methods={},
                              options={"backend": "eager"}).cache_dir == str(tmp_path / "mine")


def test_portable_compile_cache_bundle_is_keyed_saved_after_warm_up_and_loaded(pipes, tmp_path):
    import json

    from core.compile_cache import bundle_key, bundle_path

    eager, *_ = pipes
    first = core.load("example-dit")
    assert first.compile_pipeline(cache_dir=tmp_path).bundle_loaded is None  # nothing saved yet
    out = first("a red fox", **ARGS).images
    saved = first.save_compile_cache()  # after the warm-up: the bundle holds what it compiled
    key = json.loads(saved.with_suffix(".json").read_text())
    assert saved.is_file() and key["model"] == "example-dit" and key["torch"] == torch.__version__
    torch._dynamo.reset()
    second = core.load("example-dit")
    assert second.compile_pipeline(cache_dir=tmp_path).bundle_loaded == str(saved)  # same key: loaded
    assert torch.equal(second("a red fox", **ARGS).images, out)
    # another dtype, compile option or parallel layout has another key: that bundle is never loaded
    options = {"mode": "default", "dynamic": True, "fullgraph": False}
    other = bundle_path(tmp_path, {**bundle_key(eager.to("cpu", torch.float64), options), "components": ["dit", "vae"]})
    eager.to("cpu", torch.float32)
    assert other != saved and not other.exists()
    with pytest.raises(CompileError, match="cache_dir"):
        eager.save_compile_cache()


def test_unreadable_bundle_is_one_warning_ignored_without_traceback_and_rewritten(pipes, tmp_path, capfd):
    from core.compile_cache import CompileCacheWarning, load_bundle

    pipe = core.load("example-dit")
    pipe.compile_pipeline(cache_dir=tmp_path)
    saved = pipe.save_compile_cache()  # what this process compiled so far (the fixture's run): a real bundle
    good = saved.read_bytes()
    for bad in (good[: len(good) // 2], b"", b"\x80not a bundle" * 50):  # truncated, empty, garbage
        saved.write_bytes(bad)
        with pytest.warns(CompileCacheWarning, match="unreadable") as caught:
            report = core.load("example-dit").compile_pipeline(cache_dir=tmp_path)
        assert len(caught) == 1 and report.bundle_loaded is None and report.bundle_unreadable == str(saved)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "un-pickle" not in err  # torch's own report is silenced
    assert pipe.save_compile_cache() == saved and load_bundle(saved) == "loaded"  # the next save rewrites it


def test_a_block_fed_a_view_at_first_holds_one_graph():
    """The core, not the plugin, hands repeated blocks inputs that are not views: a model whose
    first block receives a slice (as a plugin with its own attention processor may) still holds one
    graph for the block class from the first call. Without the core's hook the first instance
    compiles for a view and the second for a fresh tensor: 2 graphs."""
    from core.compile import compile_components

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.lin(x)) + x

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])

        def forward(self, x):
            x = torch.cat([x, x], dim=1)[:, 2:]  # a view with a storage offset into block 0
            assert x._base is not None
            for b in self.blocks:
                x = b(x)
            return x

    torch._dynamo.reset()
    model = Model()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        ref = model(x)
        report = compile_components({"m": model}, repeated_blocks={"m": ["Block"]}, methods={},
                                    options={"dynamic": True})
        got = model(x)
    assert report.graphs() == {"m:Block": 1}
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
