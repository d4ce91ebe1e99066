"""``ditkit bench`` on the CPU: every variant measured in one process, with the numbers it promises."""
import json

import pytest

import core
from core.bench import format_bench, run_bench
from core.errors import InputError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(example_site):
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(example_site))
        mp.setattr(core.registry, "_registry", None)
        yield run_bench("example-dit", device="cpu", compare=("eager", "regional"), steps=3, progress=False,
                        height=40, width=56)


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
