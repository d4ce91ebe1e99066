"""A plugin's wrong declarations (a repeated block class or a USP split point that its model does
not have) are found on the model built on the meta device, before any work and before any rank
starts, and reported naming the plugin and its distribution."""
from __future__ import annotations

import importlib

import pytest

import core
from core.errors import CompileError, PluginError


@pytest.fixture
def registered(example, monkeypatch):
    """Make a kit plugin module the only registered plugin, from distribution 'kit-plugins'."""
    from core.registry import Registry

    def register(module: str) -> None:
        registry = Registry(strict=True)
        registry.add_plugin(importlib.import_module(module), name=module, distribution="kit-plugins")
        monkeypatch.setattr(core.registry, "_registry", registry.collect())

    return register


def _cli(capsys, *argv) -> tuple[int, str]:
    from core.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _names_the_plugin(err: str, module: str, wrong: str) -> bool:
    return all(s in err for s in (f"plugin {module!r}", "distribution 'kit-plugins'", wrong))


def test_a_repeated_block_class_that_does_not_exist_fails_before_any_work(registered, capsys, tmp_path, monkeypatch):
    registered("tests.kit_plugins.misnamed_block")
    built = []
    with monkeypatch.context() as m:
        m.setattr(core.loading, "load_spec", lambda *a, **k: built.append(a))
        code, err = _cli(capsys, "run", "wrong-block", "--compile", "--out", tmp_path / "x.png")
    assert code == 2 and built == [] and err.count("\n") == 1 and err.startswith("ditkit: error:")
    assert _names_the_plugin(err, "tests.kit_plugins.misnamed_block", "'JointBlok'"), err
    # through Python, compile_pipeline's CompileError names them too
    with pytest.raises(CompileError, match="tests.kit_plugins.misnamed_block.*kit-plugins.*JointBlok"):
        core.load("wrong-block").compile_pipeline()


def test_a_usp_split_at_a_missing_submodule_fails_before_any_rank_starts(registered, capsys, tmp_path, monkeypatch):
    registered("tests.kit_plugins.missing_split_module")
    launcher = importlib.import_module("core.parallel.launch")
    spawned = []
    monkeypatch.setattr(launcher, "launch", lambda *a, **k: spawned.append(a))
    code, err = _cli(capsys, "run", "wrong-usp-module", "--nproc", "2", "--out", tmp_path / "x.png")
    assert code == 2 and spawned == [] and err.count("\n") == 1
    assert _names_the_plugin(err, "tests.kit_plugins.missing_split_module", "'patch_embedder'"), err
    # through Python (under torchrun), before the process group is set up
    with pytest.raises(PluginError, match="missing_split_module.*kit-plugins.*patch_embedder"):
        core.load("wrong-usp-module", use_usp=True)
