"""A plugin written to plugin contract 1.0, kept as its author wrote it (``flux10/``): diffusers'
FluxTransformer2DModel with its own attention processor calling ``core.attention.attention(...,
site="joint", text_len=...)``, ``steps`` as its step argument, a ``generate()`` without
``generator``. Installed for real, it must pass ``ditkit check --usp 2`` today: every check, with
the one deprecation reported and one graph per block class."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import pip_install_target, subprocess_env

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
NOISE = ("should be kept in float32", "Writing model shards", "frame #", "Traceback")
"""Third-party output the kit must keep out of its own: diffusers' dtype notice, transformers' shard
bar (the plugin's checkpoint writer calls save_pretrained), C++ stacks, tracebacks."""


@pytest.fixture(scope="module")
def flux10_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("flux10-site")
    pip_install_target(site, HERE / "flux10")
    return site


def test_a_contract_1_0_plugin_passes_ditkit_check_usp_2_unchanged(flux10_site, tmp_path):
    report = tmp_path / "check.json"
    res = subprocess.run([sys.executable, "-m", "core.cli", "check", "flux10-tiny", "--usp", "2", "--max-examples", "1",
                          "--json", str(report)], capture_output=True, text=True, timeout=600,
                         env=subprocess_env(flux10_site))
    data = json.loads(report.read_text())
    statuses = {r["id"]: r["status"] for r in data["results"]}
    assert res.returncode == 0, (statuses, res.stdout[-3000:], res.stderr[-3000:])
    assert data["distribution"] == "ditkit-flux-contract10" and data["contract"] == "1.1"
    for r in data["results"]:  # every check passes; a skip only with the kit's reason
        assert r["status"] == "pass" or (r["status"] == "skip" and r["message"]), (r["id"], r["status"], r["message"])
    assert statuses["usp-parity"] == "pass" and statuses["no-recompile"] == "pass"
    (deprecation,) = data["deprecations"]  # one, for the plugin's 'steps', naming the new name
    assert "'steps'" in deprecation and "use 'num_inference_steps'" in deprecation and "plugin 'flux10'" in deprecation
    assert f"deprecated: {deprecation}" in res.stdout  # the table says it too
    (recompile,) = [r for r in data["results"] if r["id"] == "no-recompile"]
    # one graph per block class from the first call, with the plugin's own processor (no route_attention)
    assert recompile["details"]["graphs_after_first_call"] == {
        "transformer:FluxTransformerBlock": 1, "transformer:FluxSingleTransformerBlock": 1}
    (usp,) = [r for r in data["results"] if r["id"] == "usp-parity"]
    assert usp["details"]["cases_with_remainder"] >= 1
    out = res.stdout + res.stderr
    assert not [n for n in NOISE if n in out], out[-3000:]
