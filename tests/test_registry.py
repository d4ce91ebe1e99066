import subprocess
import sys
import textwrap
import types

import pytest

import core
from core import hookimpl
from core.errors import PluginError, UnknownModelError
from core.registry import PluginLoadWarning, Registry
from core.spec import ModelSpec, Preset

from .conftest import subprocess_env


def _spec(name="m", **kw):
    return ModelSpec(name=name, pipeline=lambda *a, **k: None, presets={"tiny": Preset(random_weights=True)}, **kw)


def _plugin(*specs):
    mod = types.ModuleType("fake_plugin")

    @hookimpl
    def ditkit_register_models():
        return list(specs)

    mod.ditkit_register_models = ditkit_register_models
    return mod


def test_example_plugin_is_discovered_through_its_entry_point(example):
    record = core.get_registry().model("example")
    assert record.spec.name == "example-dit"
    assert record.distribution == "ditkit-example-plugin"
    assert "example-dit" in core.list_models()


def test_broken_plugin_warns_naming_distribution_and_others_still_load(on_path, plugin_site, monkeypatch):
    monkeypatch.delenv("DITKIT_STRICT_PLUGINS", raising=False)
    on_path(plugin_site)
    with pytest.warns(PluginLoadWarning, match="ditkit-broken-plugin"):
        registry = core.get_registry()
    assert [f.distribution for f in registry.failures] == ["ditkit-broken-plugin"]
    assert "example-dit" in core.list_models()


def test_strict_mode_makes_a_broken_plugin_an_error(on_path, plugin_site, monkeypatch):
    monkeypatch.setenv("DITKIT_STRICT_PLUGINS", "1")
    on_path(plugin_site)
    with pytest.raises(PluginError, match="ditkit-broken-plugin"):
        core.get_registry()


def test_block_list_and_allow_list(on_path, plugin_site, monkeypatch):
    monkeypatch.setenv("DITKIT_STRICT_PLUGINS", "1")
    monkeypatch.setenv("DITKIT_DISABLE_PLUGINS", "broken")
    on_path(plugin_site)
    assert "example-dit" in core.list_models()
    monkeypatch.delenv("DITKIT_DISABLE_PLUGINS")
    monkeypatch.setenv("DITKIT_PLUGINS", "broken")
    with pytest.raises(PluginError):
        core.get_registry(refresh=True)
    monkeypatch.setenv("DITKIT_PLUGINS", "nothing-matches")
    assert core.get_registry(refresh=True).models() == []


def test_misspelled_hook_fails_loudly():
    mod = types.ModuleType("typo")

    @hookimpl
    def ditkit_register_model():  # missing "s"
        return []

    mod.ditkit_register_model = ditkit_register_model
    with pytest.raises(PluginError, match="ditkit_register_model"):
        Registry(strict=True).add_plugin(mod, name="typo", distribution="typo-dist")


def test_two_plugins_claiming_one_name_names_both_distributions():
    r = Registry(strict=True)
    r.add_plugin(_plugin(_spec("same")), name="a", distribution="dist-a")
    r.add_plugin(_plugin(_spec("other", aliases=["same"])), name="b", distribution="dist-b")
    with pytest.raises(PluginError) as info:
        r.collect()
    assert "dist-a" in str(info.value) and "dist-b" in str(info.value)


def test_invalid_record_names_plugin_and_distribution():
    mod = types.ModuleType("bad")

    @hookimpl
    def ditkit_register_models():
        return [{"name": "no-presets", "pipeline": print, "presets": {}}]

    mod.ditkit_register_models = ditkit_register_models
    r = Registry(strict=True)
    r.add_plugin(mod, name="bad", distribution="bad-dist")
    with pytest.raises(PluginError, match="bad-dist") as info:
        r.collect()
    assert "tiny" in str(info.value)


def test_hook_returning_a_single_record_instead_of_a_list_is_an_error():
    mod = types.ModuleType("single")

    @hookimpl
    def ditkit_register_models():
        return _spec("x")

    mod.ditkit_register_models = ditkit_register_models
    r = Registry(strict=True)
    r.add_plugin(mod, name="single", distribution="single-dist")
    with pytest.raises(PluginError, match="list of ModelSpec"):
        r.collect()


def test_unknown_model_lists_close_matches(example):
    with pytest.raises(UnknownModelError) as info:
        core.load("exampel-dit")
    assert "example-dit" in str(info.value)


def test_attention_kernel_hook_registers_a_selectable_kernel(monkeypatch):
    import torch

    from core import attention
    from core.spec import AttentionKernelSpec

    calls = []

    def kernel(q, k, v, *, mask=None, scale=None):
        calls.append(q.shape)
        return attention.sdpa(q, k, v, mask=mask, scale=scale)

    mod = types.ModuleType("kern")

    @hookimpl
    def ditkit_register_attention_kernels():
        return [AttentionKernelSpec(name="counting", kernel=kernel)]

    mod.ditkit_register_attention_kernels = ditkit_register_attention_kernels
    r = Registry(strict=True)
    r.add_plugin(mod, name="kern", distribution="kern-dist")
    assert [k.name for k in r.kernels()] == ["counting"]
    attention.register_kernel("counting", kernel)
    q = torch.randn(1, 5, 2, 8)
    with attention.use_kernel("counting"):
        out = attention.attention(q, q, q)
    assert calls == [(1, 2, 5, 8)]
    torch.testing.assert_close(out, attention.attention(q, q, q))
    monkeypatch.setenv("DITKIT_ATTENTION", "nope")
    with pytest.raises(ValueError, match="counting"):
        attention.attention(q, q, q)


def test_nothing_loads_at_import_time(example_site):
    code = textwrap.dedent(
        """
        import sys, core, core.registry
        assert core.registry._registry is None
        assert not [m for m in sys.modules if m.startswith("ditkit_example")]
        core.list_models()
        assert "ditkit_example.plugin" in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env(example_site), timeout=120)


def test_every_hook_is_documented_and_tested():
    import inspect
    from pathlib import Path

    from core import hookspecs

    hooks = [name for name, fn in vars(hookspecs).items() if name.startswith("ditkit_") and inspect.isfunction(fn)]
    assert hooks, "no hooks found"
    tests_text = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for name in hooks:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Returns:" in doc and "Example::" in doc, f"hook {name} needs Returns: and Example:: in its docstring"
        assert f"def {name}(" in tests_text, f"hook {name} has no test implementing it"
