"""``ditkit bench`` on the CPU: every variant measured in one process, with the numbers it promises."""
import json

import pytest
import torch

import core
from core.bench import format_bench, run_bench
from core.errors import InputError

pytestmark = pytest.mark.slow


MEASURED = []
"""The variant of every measured step of the module's bench, in the order they ran."""


@pytest.fixture(scope="module")
def report(example_site):
    from core import bench

    measure = bench._Run.measure_step

    def recorded(run, call):
        MEASURED.append(run.variant)
        return measure(run, call)

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(example_site))
        mp.setattr(core.registry, "_registry", None)
        with pytest.MonkeyPatch.context() as recording:
            recording.setattr(bench._Run, "measure_step", recorded)
            result = run_bench("example-dit", device="cpu", compare=("eager", "regional"), steps=3, progress=False,
                               height=40, width=56)
        yield result


def test_bench_reports_each_variant_with_ratio_graphs_and_tokens(report):
    eager, regional = report["results"]
    assert (eager["variant"], regional["variant"]) == ("eager", "regional")
    assert len(eager["step_times_s"]) == 3 and eager["ratio_to_eager"] == 1.0
    assert regional["ratio_to_eager"] == pytest.approx(eager["step_s"] / regional["step_s"])
    assert eager["graphs"] == 0 and regional["recompiles"] == 0
    # one graph per block class (2) plus the VAE's decode, none recompiled, no graph break
    assert regional["compiled"] == {"dit:JointBlock": 1, "dit:SingleBlock": 1, "vae:TinyDecoder.decode": 1}
    assert regional["graph_breaks"] == 0
    assert eager["tokens"] == (40 // 8) * (56 // 8)
    assert report["environment"]["torch"] and report["call"] == {"guidance_scale": 1.0, "height": 40, "width": 56}
    table = format_bench(report)
    assert "regional" in table and "vs eager" in table


def test_bench_cli_writes_json(example_site, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(example_site))
    monkeypatch.setattr(core.registry, "_registry", None)
    from core.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "example", "--compare", "eager", "--steps", "2", "--json", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "example-dit" and data["results"][0]["variant"] == "eager"
    assert "example-dit" in capsys.readouterr().out
    with pytest.raises(InputError, match="fast"):
        run_bench("example-dit", compare=("fast",))


def test_bench_interleaves_the_measured_steps_and_reports_their_spread(report):
    assert MEASURED == ["eager", "regional"] * 3 and report["order"] == "round-robin"
    for r in report["results"]:
        times = r["step_times_s"]
        assert (r["step_min_s"], r["step_max_s"]) == (pytest.approx(min(times), abs=1e-5), pytest.approx(max(times), abs=1e-5))
        assert r["spread"] == pytest.approx(r["step_max_s"] / r["step_min_s"], rel=1e-3)


def test_bench_table_flags_a_variant_whose_steps_spread_past_the_limit(report):
    quiet = format_bench(report | {"results": [r | {"spread": 1.29} for r in report["results"]]})  # just under 1.3
    assert "!" not in quiet and "min" in quiet and "max/min" in quiet
    just_over = format_bench(report | {"results": [r | {"spread": 1.31} for r in report["results"]]})
    assert just_over.count("1.31!") == len(report["results"])
    noisy = [r | {"spread": 2.62, "step_min_s": 0.45, "step_max_s": 1.18} if r["variant"] == "eager" else r | {"spread": 1.1}
             for r in report["results"]]
    table = format_bench(report | {"results": noisy})
    (note,) = [line for line in table.splitlines() if line.startswith("!")]
    assert "eager" in note and "2.62" in note and "1.3" in note and "2.62!" in table


def test_whole_variant_counts_tokens_without_a_recompile(example_site, monkeypatch):
    """The bench's token-counting hook runs inside the ``whole``-compiled forward; reading its own
    state there was a guard that failed after the warm-up: a recompile in the first measured step,
    flagged as a noisy machine. Dynamo's eager backend: the guards are dynamo's, inductor adds time only."""
    monkeypatch.syspath_prepend(str(example_site))
    monkeypatch.setattr(core.registry, "_registry", None)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "eager"}))
    (whole,) = run_bench("example-dit", device="cpu", compare=("whole",), steps=1, progress=False,
                         height=32, width=32)["results"]
    assert whole["recompiles"] == 0 and whole["graphs"] == 1 and whole["tokens"] == (32 // 8) * (32 // 8)
