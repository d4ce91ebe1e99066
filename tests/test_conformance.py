"""The conformance kit on the example plugin, and on wrong plugins that must fail one check each."""
import subprocess
import sys
import warnings

import pytest

from core.testing import CHECK_IDS, KitOptions, PluginConformance, Subject, UnknownExpectedFailure, run_checks

from .conftest import subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _example_on_path(example_site):
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(example_site))
        yield


class TestExamplePlugin(PluginConformance):
    """How a plugin author uses the kit: subclass, name the model."""

    model_name = "example-dit"
    plugin = "ditkit_example.plugin"


def _statuses(plugin: str, name: str) -> dict[str, str]:
    results = run_checks(Subject(name, plugin=plugin), KitOptions(max_examples=1))
    return {r.id: r.status for r in results}


def _only_failure(statuses: dict[str, str], check_id: str) -> None:
    failing = sorted(k for k, v in statuses.items() if v in ("fail", "error", "xpass"))
    assert failing == [check_id], statuses


def test_misnamed_repeated_block_fails_only_the_block_check():
    statuses = _statuses("tests.kit_plugins.misnamed_block", "wrong-block")
    _only_failure(statuses, "repeated-blocks")
    assert statuses["compile-parity"] == "skip" and statuses["usp-parity"] == "pass"


def test_usp_adapter_splitting_the_wrong_dim_fails_only_usp_parity():
    statuses = _statuses("tests.kit_plugins.wrong_split_dim", "wrong-usp")
    _only_failure(statuses, "usp-parity")


def test_compiled_path_that_differs_from_eager_fails_only_compile_parity():
    statuses = _statuses("tests.kit_plugins.compile_drift", "wrong-compile")
    _only_failure(statuses, "compile-parity")


def test_expected_failures_are_data_and_unknown_entries_warn():
    subject = Subject("wrong-block", plugin="tests.kit_plugins.misnamed_block")
    with pytest.warns(UnknownExpectedFailure, match="no-such-check"):
        results = run_checks(subject, pattern="repeated-blocks",
                             xfail={"repeated-blocks": "known: renamed upstream", "no-such-check": "typo"})
    assert [(r.id, r.status) for r in results] == [("repeated-blocks", "xfail")]
    assert "renamed upstream" in results[0].message


def test_check_ids_are_selectable_with_k():
    subject = Subject("example-dit", plugin="ditkit_example.plugin")
    results = run_checks(subject, pattern="weights")
    assert [r.id for r in results] == ["weights-load", "weights-corrupt"] and all(r.status == "pass" for r in results)
    assert set(CHECK_IDS) >= {"spec-valid", "usp-parity", "bad-input", "no-recompile"}


def test_ditkit_check_cli_prints_a_table_and_exits_non_zero_on_failure(example_site):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "core.cli", "check", *args], capture_output=True, text=True,
                              env=subprocess_env(example_site), timeout=300)

    ok = run("example-dit", "-k", "spec")
    assert ok.returncode == 0 and "spec-valid" in ok.stdout and "PASS" in ok.stdout
    bad = run("wrong-block", "--plugin", "tests.kit_plugins.misnamed_block", "-k", "block", "--json")
    assert bad.returncode == 1 and '"status": "fail"' in bad.stdout


def test_usp_parity_reports_the_split_lengths_and_fails_when_no_case_had_a_remainder():
    results = run_checks(Subject("even-lengths", plugin="tests.kit_plugins.even_lengths_only"),
                         KitOptions(max_examples=1), pattern="usp-parity")
    (usp,) = results
    assert usp.status == "fail" and "remainder" in usp.message, usp.message
    splits = [s for case in usp.details["cases"] for s in case["splits"]]
    assert splits and all(s["remainder"] == 0 and s["total"] % 2 == 0 for s in splits)


def test_usp_parity_fails_when_the_pad_key_mask_is_disabled():
    """Mutation: the core's pad-key mask switched off in every rank. The example and Wan uneven
    calls (35 and 9 tokens) then differ from one process, and the kit must say so."""
    for name in ("example-dit", "wan2.1-t2v-1.3b"):
        (usp,) = run_checks(Subject(name, plugin="tests.kit_plugins.no_pad_mask"), KitOptions(max_examples=1),
                            pattern="usp-parity")
        assert usp.status == "fail", (name, usp.status, usp.message)
        worst = {str(c["call"]): c["error"] for c in usp.details["cases"] if any(s["remainder"] for s in c["splits"])}
        assert worst and max(worst.values()) > usp.details["tolerance"], worst


def test_no_recompile_counts_graphs_from_the_first_call():
    """A block class whose second instance recompiles during the first call fails no-recompile,
    though every later call is served from the cache."""
    results = run_checks(Subject("recompiling-block", plugin="tests.kit_plugins.per_instance_constant"),
                         KitOptions(max_examples=1), pattern="no-recompile")
    (check,) = results
    assert check.status == "fail" and check.details["graphs_after_first_call"]["dit:JointBlock"] == 2, check.message


def test_check_json_carries_the_numbers(example_site):
    res = subprocess.run([sys.executable, "-m", "core.cli", "check", "example-dit", "-k", "usp", "--json"],
                         capture_output=True, text=True, env=subprocess_env(example_site), timeout=300)
    import json

    report = json.loads(res.stdout[res.stdout.index("{"):])
    (usp,) = report["results"]
    assert usp["status"] == "pass" and usp["details"]["tolerance"] == 1e-5
    assert usp["details"]["max_error"] <= 1e-5 and usp["details"]["cases_with_remainder"] >= 1
    uneven = [s for c in usp["details"]["cases"] for s in c["splits"] if s["total"] == 35]
    assert uneven and uneven[0]["per_rank"] == [18, 17] and uneven[0]["pad"] == 1
