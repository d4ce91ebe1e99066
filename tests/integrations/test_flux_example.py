"""The diffusers Flux example plugin, installed for real: the kit's fast checks (the compile and
USP checks are run with ``ditkit check diffusers-flux --usp 2`` / ``--usp 4``; the same mechanisms
are tested on the nine diffusers classes with a _cp_plan directly in test_diffusers.py), its
reference (diffusers' own ``FluxPipeline``) and three mutations of its pipeline that only that
reference catches."""
from __future__ import annotations

import pytest

from ..conftest import EXAMPLES, pip_install_target

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

FAST = ["spec-valid", "presets-resolve", "tiny-builds", "weights-load", "weights-corrupt", "repeated-blocks",
        "determinism", "end-to-end", "bad-input", "reference-parity"]


@pytest.fixture(scope="module")
def flux_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("flux-site")
    pip_install_target(site, EXAMPLES / "ditkit-diffusers-flux")
    return site


def test_flux_example_fast_checks(flux_site, on_path, monkeypatch):
    monkeypatch.setenv("DITKIT_STRICT_PLUGINS", "1")
    on_path(flux_site)
    from core.registry import get_registry
    from core.testing import KitOptions, Subject
    from core.testing.checks import CHECKS
    from core.testing.runner import run_one

    record = get_registry().model("dflux")
    assert record.distribution == "ditkit-diffusers-flux"
    adapter = record.spec.usp[0]  # derived from diffusers' _cp_plan: image split, text whole, sites inferred
    assert {s.arg for s in adapter.splits} == {"hidden_states", "img_ids"} and set(adapter.sites) == {"dispatch"}
    assert (24 // 8) * (40 // 8) % 2 and (24 // 8) * (40 // 8) % 4  # the declared uneven call: 15 tokens
    assert record.spec.conformance.uneven_call == {"height": 24, "width": 40}
    subject, done = Subject("diffusers-flux"), {}
    for check in (c for c in CHECKS if c.id in FAST):
        done[check.id] = result = run_one(check, subject, KitOptions(), {}, done)
        assert result.status == "pass", f"{check.id}: {result.status}: {result.message}"
    ladder = done["reference-parity"].details
    assert ladder["compared"] == ["text_embeddings", "sigmas", "velocity", "latents", "output"]
    assert ladder["call"]["guidance_scale"] > 1 and ladder["first_difference"] is None  # with true CFG
    assert all(row["error"] <= row["tolerance"] for row in ladder["stages"]), ladder["stages"]


MUTANT_CHECKS = ["tiny-builds", "determinism", "end-to-end", "bad-input", "reference-parity"]
"""Checks run on each mutant here (the others, compile and USP included, were run by hand on each
mutant with ``ditkit check NAME --plugin tests.kit_plugins.flux_mutants --usp 2``: all pass but
reference-parity; CONTRIBUTING.md, "Fidelity")."""


@pytest.mark.parametrize("name", ["flux-wrong-schedule", "flux-wrong-guidance", "flux-unscaled-decode"])
def test_reference_parity_names_the_stage_each_mutation_breaks(flux_site, on_path, name):
    on_path(flux_site)
    from core.testing import KitOptions, Subject
    from core.testing.checks import CHECKS
    from core.testing.runner import run_one
    from tests.kit_plugins.flux_mutants import MUTANTS

    subject, done = Subject(name, plugin="tests.kit_plugins.flux_mutants"), {}
    for check in (c for c in CHECKS if c.id in MUTANT_CHECKS):
        done[check.id] = run_one(check, subject, KitOptions(), {}, done)
    statuses = {k: r.status for k, r in done.items()}
    assert statuses == {**dict.fromkeys(MUTANT_CHECKS, "pass"), "reference-parity": "fail"}, done
    ladder = done["reference-parity"].details
    first = MUTANTS[name][1]
    assert ladder["first_difference"] == first and f"first stage that differs from the reference: {first}" in \
        done["reference-parity"].message
    rows = {row["stage"]: row for row in ladder["stages"]}
    before = list(rows)[:list(rows).index(first)]
    assert all(rows[s]["status"] == "match" for s in before), rows  # the stages before it still agree
