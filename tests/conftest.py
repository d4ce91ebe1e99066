"""Shared fixtures: the example plugins installed for real, and a registry that sees them."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def pip_install_target(target: Path, *projects: Path) -> None:
    """``pip install --no-deps --target``: the plugins become real distributions with entry points."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
           *map(str, projects)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A folder holding the installed example and broken plugins (not yet on sys.path)."""
    site = tmp_path_factory.mktemp("plugin-site")
    pip_install_target(site, EXAMPLES / "ditkit-example-plugin", EXAMPLES / "ditkit-broken-plugin")
    return site


@pytest.fixture(scope="session")
def example_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("example-site")
    pip_install_target(site, EXAMPLES / "ditkit-example-plugin")
    return site


@pytest.fixture
def on_path(monkeypatch):
    """Put an installed-plugin folder on sys.path for one test and reset the registry."""
    import core.registry

    def add(site: Path) -> None:
        monkeypatch.syspath_prepend(str(site))
        importlib.invalidate_caches()
        monkeypatch.setattr(core.registry, "_registry", None)

    monkeypatch.setattr(core.registry, "_registry", None)
    yield add


@pytest.fixture
def example(on_path, example_site, monkeypatch):
    """The example plugin installed and discovered in strict mode."""
    monkeypatch.setenv("DITKIT_STRICT_PLUGINS", "1")
    for var in ("DITKIT_PLUGINS", "DITKIT_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    on_path(example_site)
    import core

    return core


def subprocess_env(*sites: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, sites), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env
