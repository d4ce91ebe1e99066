"""scripts/gpu_all.sh end to end on the CPU (``--device cpu --tiny``): every stage, the budget,
the time limits, a forced failure, and the files a GPU run brings back.

One run (module fixture) with ``smoke_usp`` forced to fail and ``bench_wan14`` forced over a
0.5 s limit; the stages after each still run. A second run with no budget skips every stage for
time. The GPU plan (``--plan``) is checked against ``ditkit bench``'s and
``scripts/offload_gpu.py``'s own argument parsers, so a mistyped flag fails here rather than on the
lent machine.
"""
import argparse
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_all.sh"
ROWS = ["smoke_usp.json", "bench_wan13.json", "bench_qwen.json", "bench_wan14.json", "attention.json", "offload.json"]

pytestmark = pytest.mark.slow


def gpu_all(*args, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-all")
    proc = gpu_all("--device", "cpu", "--tiny", "--fail", "smoke_usp", "--limit", "bench_wan14=0.5", str(out))
    summary = json.loads((out / "summary.json").read_text())
    return proc, out, summary, {s["stage"]: s for s in summary["stages"]}


def test_writes_the_summary_the_log_and_one_json_per_row(tiny_run):
    proc, out, summary, _ = tiny_run
    # the device tool brings back at most 8 files: exactly these
    assert sorted(p.name for p in out.iterdir()) == sorted(["summary.json", "gpu_all.log", *ROWS])
    for row in ROWS:
        json.loads((out / row).read_text())
    assert summary["finished"] and summary["device"] == "cpu" and summary["tiny"]
    assert "current environment" in summary["install"]
    log = (out / "gpu_all.log").read_text()
    assert "=== bench_wan13:" in log and "=== attention:" in log
    assert "gpu_all:" in proc.stdout


def test_records_a_failed_stage_and_goes_on(tiny_run):
    proc, out, summary, stages = tiny_run
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a stage failed, so the run says so
    smoke = stages["smoke_usp"]
    assert smoke["status"] == "failed" and smoke["returncode"] == 1 and "forced failure" in smoke["tail"]
    assert json.loads((out / "smoke_usp.json").read_text())["status"] == "failed"
    # every stage after it ran
    assert [s["stage"] for s in summary["stages"]] == ["install", "smoke_usp", "bench_wan13", "bench_qwen",
                                                        "bench_wan14", "attention", "offload"]
    assert stages["install"]["status"] == "passed" and "current environment" in stages["install"]["reason"]
    assert stages["bench_wan13"]["status"] == "passed" and stages["attention"]["status"] == "passed"


def test_kills_a_stage_at_its_limit_and_goes_on(tiny_run):
    _, out, _, stages = tiny_run
    wan14 = stages["bench_wan14"]
    assert wan14["status"] == "timeout" and wan14["limit_s"] == 0.5 and wan14["elapsed_s"] < 15
    row = json.loads((out / "bench_wan14.json").read_text())
    assert row["status"] == "timeout" and "0.5" in row["reason"]
    assert stages["attention"]["status"] == "passed"  # the stage after it


def test_no_stage_limit_exceeds_the_budget_left(tiny_run):
    _, _, summary, _ = tiny_run
    ran = [s for s in summary["stages"] if "limit_s" in s]
    assert len(ran) == 7 and all(s["limit_s"] <= s["budget_left_s"] for s in ran)
    assert summary["elapsed_s"] < summary["budget_s"]


def test_rows_hold_the_json_their_commands_wrote(tiny_run):
    _, out, _, stages = tiny_run
    for row, model in (("bench_wan13.json", "wan2.1-t2v-1.3b"), ("bench_qwen.json", "qwen-image")):
        bench = json.loads((out / row).read_text())  # ditkit bench's own report, untouched
        assert bench["model"] == model and bench["results"][0]["variant"] == "eager"
        assert len(bench["results"][0]["step_times_s"]) >= 1 and bench["environment"]["torch"]
    attention = json.loads((out / "attention.json").read_text())
    assert attention["shapes"] and all(s["chosen"] for s in attention["shapes"])
    # scripts/offload_gpu.py's own report: the parts the GPU runs, at tiny size
    assert stages["offload"]["status"] == "passed", stages["offload"]
    offload = json.loads((out / "offload.json").read_text())
    assert offload["parts"] == ["parity", "step", "memory"] and offload["finished"] and offload["passed"]
    assert offload["parity"] and all(r["equal"] for r in offload["parity"])
    assert set(offload["step"]["modes"]) == {"resident", "block", "disk"}
    assert {r["mode"] for r in offload["memory"]} == {"model", "block", "none"}


def test_a_stage_that_does_not_fit_the_budget_is_skipped_and_recorded(tmp_path):
    proc = gpu_all("--device", "cpu", "--tiny", "--budget", "0", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    skipped = {s["stage"]: s for s in summary["stages"] if s["status"] == "skipped-for-time"}
    assert set(skipped) == {"install", "smoke_usp", "bench_wan13", "bench_qwen", "bench_wan14", "attention", "offload"}
    assert all("elapsed_s" not in s and "budget left" in s["reason"] for s in skipped.values())
    assert json.loads((tmp_path / "bench_wan13.json").read_text())["status"] == "skipped-for-time"


def test_a_stage_runs_with_what_is_left_of_the_budget_when_less_than_its_limit(tmp_path):
    # 5 s budget, 3 s of it kept back for the summary: the install (limit 120 s) gets at most 2 s
    gpu_all("--device", "cpu", "--tiny", "--budget", "5", "--only", "bench_qwen", str(tmp_path), timeout=120)
    stages = {s["stage"]: s for s in json.loads((tmp_path / "summary.json").read_text())["stages"]}
    ran = [s for s in stages.values() if "limit_s" in s]
    assert stages["install"] in ran and all(s["limit_s"] <= min(2.0, s["budget_left_s"]) for s in ran)
    assert stages["bench_wan13"]["status"] == stages["attention"]["status"] == "not-selected"  # --only
    assert stages["bench_qwen"]["status"] != "not-selected"
    assert gpu_all("--device", "cpu", "--only", "bench_nope", str(tmp_path), timeout=120).returncode == 2


def test_the_gpu_plan_runs_the_real_configs_with_flags_ditkit_bench_accepts(capsys, tmp_path):
    from core.bench import add_arguments

    main = runpy.run_path(str(ROOT / "scripts" / "gpu_all.py"))["main"]
    assert main(["--plan", "--wheels", str(tmp_path), str(tmp_path / "out")]) == 0
    plan = {s["stage"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert sum(s["limit_s"] for s in plan.values()) >= 480 and not (tmp_path / "out").exists()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    rows = {}
    for name in ("bench_wan13", "bench_qwen", "bench_wan14"):
        cmd = plan[name]["command"]
        assert cmd[1:4] == ["-m", "core.cli", "bench"]
        rows[name] = parser.parse_args(cmd[4:])
    wan13, qwen, wan14 = rows["bench_wan13"], rows["bench_qwen"], rows["bench_wan14"]
    assert (wan13.model, wan13.preset, wan13.height, wan13.width, wan13.num_frames, wan13.dtype, wan13.compare) == (
        "wan2.1-t2v-1.3b", "official", 480, 832, 81, "bf16", "eager,regional,whole")
    assert (qwen.model, qwen.height, qwen.width, qwen.compare, qwen.dtype) == ("qwen-image", 1328, 1328, "eager,regional", "bf16")
    assert (wan14.model, wan14.preset, wan14.num_frames, wan14.guidance_scale, wan14.steps, wan14.compare) == (
        "wan2.1-t2v-14b", "official", 81, 5.0, 1, "regional")
    assert all(r.device == "cuda" for r in rows.values())
    assert "torch.distributed.run" in plan["smoke_usp"]["command"]
    offload_gpu = runpy.run_path(str(ROOT / "scripts" / "offload_gpu.py"))
    cmd = plan["offload"]["command"]
    assert cmd[1].endswith("scripts/offload_gpu.py")
    offload = offload_gpu["parser"]().parse_args(cmd[2:])
    assert (offload.device, offload.tiny, offload.steps, offload.frames, offload.json) == (
        "cuda", False, 3, 17, str(tmp_path / "out" / "offload.json"))
    assert offload_gpu["parts_of"](offload.only) == ["parity", "step", "memory"]
    assert "error: no wheels" in plan["install"]["command"]  # an empty wheel folder is named, not installed from


def test_the_offload_report_keeps_the_parts_done_when_a_later_part_dies(tmp_path):
    # a stage killed at its limit leaves offload.json as the script last wrote it
    main = runpy.run_path(str(ROOT / "scripts" / "offload_gpu.py"))["main"]
    parts = main.__globals__  # the functions main calls
    parts["parity"] = lambda device: [{"model": "m", "mode": "block", "equal": True, "left_on_device": []}]

    def killed(*args):
        raise KeyboardInterrupt("killed at the stage's limit")

    parts["step"] = killed
    out = tmp_path / "offload.json"
    with pytest.raises(KeyboardInterrupt):
        main(["--device", "cpu", "--tiny", "--only", "parity,step", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["parity"][0]["equal"] and not report["finished"] and "step" not in report


def test_a_stage_is_killed_when_the_budget_left_runs_out_before_its_limit(tmp_path, monkeypatch):
    """The process itself, not only the recorded limit, gets what is left of the budget: a stage with
    a 120 s limit and 1.5 s left is killed at about 1.5 s."""
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("gpu_all_under_test", ROOT / "scripts" / "gpu_all.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "command", lambda stage, ctx: [sys.executable, "-c", "import time; time.sleep(60)"])
    stage = next(s for s in module.STAGES if s.name == "bench_qwen")
    ctx = module.Context(out=tmp_path, device="cpu", tiny=True, python=sys.executable, work=tmp_path, wheels=None,
                         site=tmp_path / "site", env=dict(os.environ))
    args = argparse.Namespace(limit={}, only=[], skip=[], fail=[])
    log_path = tmp_path / "gpu_all.log"
    with open(log_path, "w") as log:
        record = module.run_stage(stage, ctx, args, time.monotonic() + module.RESERVE_S + 1.5, log, log_path)
    assert stage.tiny_limit_s >= 60 and record["limit_s"] <= 1.5
    assert record["status"] == "timeout" and record["elapsed_s"] < 15, record


def test_two_wheels_of_one_distribution_are_named_not_installed(capsys, tmp_path):
    main = runpy.run_path(str(ROOT / "scripts" / "gpu_all.py"))["main"]
    for name in ("pluggy-1.6.0-py3-none-any.whl", "pluggy-1.7.0-py3-none-any.whl", "av-19.0.2-cp312-cp312-x.whl"):
        (tmp_path / name).write_bytes(b"")
    assert main(["--plan", "--wheels", str(tmp_path), str(tmp_path / "out")]) == 0
    install = next(s for s in json.loads(capsys.readouterr().out)["stages"] if s["stage"] == "install")
    assert install["command"].startswith("error: two wheels of pluggy") and "1.6.0" in install["command"]
