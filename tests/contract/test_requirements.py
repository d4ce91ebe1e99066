"""The contract version, and plugins that state which contract they need: refused when it does not match,
with one message naming the plugin, its requirement and the running version."""
from __future__ import annotations

import importlib.metadata as md
import textwrap
import types

import pytest

import core
from core import hookimpl
from core.contract import CONTRACT_VERSION, RELEASES
from core.errors import PluginError
from core.registry import PluginLoadWarning, Registry
from core.spec import ModelSpec, Preset


def test_the_package_version_and_the_contract_version_agree():
    assert core.CONTRACT_VERSION == CONTRACT_VERSION == "1.1"
    assert core.__version__ == md.version("ditkit") == "0.2.0"  # pyproject.toml and core/__init__.py moved together
    assert RELEASES[core.__version__] == CONTRACT_VERSION and RELEASES["0.1.0"] == "1.0"


def _plugin(*contracts):
    mod = types.ModuleType("stating_plugin")

    @hookimpl
    def ditkit_register_models():
        return [ModelSpec(name=f"m{i}", pipeline=print, presets={"tiny": Preset(random_weights=True)}, contract=c)
                for i, c in enumerate(contracts)]

    mod.ditkit_register_models = ditkit_register_models
    return mod


def _registry(strict: bool, *contracts) -> Registry:
    r = Registry(strict=strict)
    r.add_plugin(_plugin(*contracts), name="stating", distribution="stating-dist")
    return r.collect()


def test_a_model_stating_a_contract_it_cannot_get_is_refused_naming_plugin_requirement_and_version():
    with pytest.warns(PluginLoadWarning) as caught:
        r = _registry(False, ">=1.0,<2", ">=2.0", None, "==1.0")
    assert [m.spec.name for m in r.models()] == ["m0", "m2"]  # the matching and the silent one load
    (too_new, only_old) = [str(w.message) for w in caught]
    for message, requirement in ((too_new, ">=2.0"), (only_old, "==1.0")):
        assert "'stating'" in message and "'stating-dist'" in message and requirement in message
        assert f"contract {CONTRACT_VERSION}" in message and "ditkit 0.2.0" in message
    with pytest.raises(PluginError, match=r"'m0' requires plugin contract >=2\.0 .* implements contract 1\.1"):
        _registry(True, ">=2.0")


def test_a_contract_that_is_not_a_version_specifier_is_an_invalid_record():
    with pytest.raises(PluginError, match="not a version specifier"):
        _registry(True, "1.1")


_REFUSED_AT_IMPORT = """
    raise RuntimeError("imported although its distribution's requirement on ditkit does not match")
"""


def _distribution(site, name: str, requires: list[str], monkeypatch):
    monkeypatch.syspath_prepend(str(site))  # importable: only the refusal keeps it from being imported
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    lines = "".join(f"Requires-Dist: {r}\n" for r in requires)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n{lines}")
    module = name.replace("-", "_")
    (info / "entry_points.txt").write_text(f"[ditkit.plugins]\n{name} = {module}\n")
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(_REFUSED_AT_IMPORT))
    (dist,) = md.distributions(path=[str(site)])
    return dist


def test_a_distribution_requiring_another_ditkit_is_refused_before_its_module_is_imported(tmp_path, monkeypatch):
    old = _distribution(tmp_path / "a", "needs-old-ditkit", ["ditkit<0.2,>=0.1", "torch"], monkeypatch)
    with pytest.warns(PluginLoadWarning) as caught:
        r = Registry(strict=False).discover(entry_points=old.entry_points)
    (message,) = [str(w.message) for w in caught]
    assert "'needs-old-ditkit'" in message and "ditkit<0.2,>=0.1" in message
    assert "running ditkit 0.2.0" in message and f"contract {CONTRACT_VERSION}" in message
    assert "imported although" not in message  # refused from its metadata, not from an import error
    assert [f.distribution for f in r.failures] == ["needs-old-ditkit"]
    with pytest.raises(PluginError, match="needs-old-ditkit"):
        Registry(strict=True).discover(entry_points=old.entry_points)


def test_a_requirement_ditkit_satisfies_or_one_of_an_extra_is_no_refusal(tmp_path, monkeypatch):
    """The same module (which raises at import) is imported when the requirement matches: the
    import error, not a refusal, is then what the registry reports."""
    fine = _distribution(tmp_path / "b", "needs-this-ditkit",
                         ["ditkit[diffusers]>=0.2", 'ditkit<0.1; extra == "legacy"', "numpy"], monkeypatch)
    with pytest.warns(PluginLoadWarning, match="imported although"):
        Registry(strict=False).discover(entry_points=fine.entry_points)
