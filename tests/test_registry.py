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


def _fake_distribution(site, dist: str, ep_name: str, module: str, source: str) -> None:
    """A distribution on ``site`` (dist-info with an entry point) without pip: what importlib.metadata sees."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ditkit.plugins]\n{ep_name} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))


_IMPOSTOR = """
    from core import hookimpl
    from core.spec import ModelSpec, Preset

    @hookimpl
    def ditkit_register_models():
        return [ModelSpec(name="impostor-model", aliases=["wan"], pipeline=print, presets={"tiny": Preset(random_weights=True)})]
"""


def test_a_second_distribution_named_wan_never_shadows_the_builtin(on_path, tmp_path, monkeypatch):
    for var in ("DITKIT_STRICT_PLUGINS", "DITKIT_PLUGINS", "DITKIT_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    _fake_distribution(tmp_path, "impostor", "wan", "impostor_wan", _IMPOSTOR)
    on_path(tmp_path)  # first on sys.path
    with pytest.warns(PluginLoadWarning, match="'impostor'.*'ditkit'|'ditkit'.*'impostor'"):
        registry = core.get_registry()
    assert registry.model("wan").distribution == "ditkit" and "impostor-model" not in core.list_models()
    assert [f.distribution for f in registry.failures] == ["impostor"]
    monkeypatch.setenv("DITKIT_PLUGINS", "wan@impostor")  # the user's allow-list may pick it
    registry = core.get_registry(refresh=True)
    assert core.list_models() == ["impostor-model"] and registry.model("impostor-model").distribution == "impostor"
    monkeypatch.delenv("DITKIT_PLUGINS")
    monkeypatch.setenv("DITKIT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="impostor"):
        core.get_registry(refresh=True)


def test_systemexit_at_import_is_a_load_failure_not_an_exit(on_path, tmp_path, monkeypatch):
    monkeypatch.delenv("DITKIT_STRICT_PLUGINS", raising=False)
    _fake_distribution(tmp_path, "exiter", "exiter", "exiter_mod", "raise SystemExit(3)\n")
    on_path(tmp_path)
    with pytest.warns(PluginLoadWarning, match="exiter.*SystemExit"):
        assert "wan2.1-t2v-1.3b" in core.list_models()
    with pytest.raises(UnknownModelError) as info:
        core.load("exiter-model")
    assert "'exiter'" in str(info.value) and "SystemExit" in str(info.value)  # says which plugin failed and why
    res = subprocess.run([sys.executable, "-m", "core.cli", "plugins"], capture_output=True, text=True, timeout=120,
                         env=subprocess_env(tmp_path))
    assert res.returncode == 0 and "exiter" in res.stdout and "FAILED TO LOAD" in res.stdout


def _hook_returning(value_or_exc):
    mod = types.ModuleType("misbehaving")

    @hookimpl
    def ditkit_register_models():
        if isinstance(value_or_exc, BaseException):
            raise value_or_exc
        return value_or_exc

    mod.ditkit_register_models = ditkit_register_models
    return mod


MISBEHAVING = {
    "hook-raises": RuntimeError("hook exploded"),
    "hook-exits": SystemExit(3),
    "returns-a-string": "not a list",
    "returns-junk-items": [42, {"name": 7}],
    "claims-alias-wan": [_spec("other-model", aliases=["wan"])],
    "claims-builtin-name": [_spec("wan2.1-t2v-1.3b")],
}


@pytest.mark.parametrize("case", sorted(MISBEHAVING))
def test_a_misbehaving_hook_is_isolated_in_lenient_mode_and_an_error_in_strict(case):
    import plugins.wan.plugin as wan_plugin

    def build(strict: bool) -> Registry:
        r = Registry(strict=strict)
        r.add_plugin(_plugin(_spec("bystander")), name="bystander", distribution="bystander-dist")
        r.add_plugin(_hook_returning(MISBEHAVING[case]), name="rogue", distribution="rogue-dist")
        r.add_plugin(wan_plugin, name="wan", distribution="ditkit")
        return r.collect()

    with pytest.warns(PluginLoadWarning, match="'rogue'.*'rogue-dist'"):
        r = build(strict=False)
    assert r.model("wan").spec.name == "wan2.1-t2v-1.3b" and r.model("wan").distribution == "ditkit"
    assert r.model("bystander").plugin == "bystander"
    assert [f.plugin for f in r.failures] == ["rogue"]
    with pytest.raises(PluginError, match="rogue-dist"):
        build(strict=True)


def test_unknown_model_offers_close_matches_only():
    r = Registry(strict=True)
    r.add_plugin(_plugin(_spec("alpha-model"), _spec("zeta")), name="p", distribution="p-dist")
    with pytest.raises(UnknownModelError) as info:
        r.model("alpha-modle")
    assert "did you mean 'alpha-model'" in str(info.value) and "zeta" not in str(info.value)
