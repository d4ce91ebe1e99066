"""scripts/gpu_wheels_check.py, the checks scripts/gpu_wheels.sh runs on the wheels it downloads
(the download itself needs PyPI and is not run here): one wheel per distribution, every declared
requirement met, and the size against the device call's carry limit. Small wheels built here."""
import runpy
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def wheel(folder: Path, name: str, version: str, *requires: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                      *(f"Requires-Dist: {r}" for r in requires)])
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta + "\n")
    return path


@pytest.fixture
def check():
    return runpy.run_path(str(ROOT / "scripts" / "gpu_wheels_check.py"))["main"]


def test_a_complete_set_passes_and_reports_its_size(check, tmp_path, capsys):
    wheel(tmp_path, "pkg_a", "1.0", "pkg-b>=2", "torch", 'colorama; sys_platform == "win32"',
          'typing-extensions; python_version < "3.8"')
    wheel(tmp_path, "pkg_b", "2.0")
    assert check([str(tmp_path)]) == 0
    assert "gpu_wheels: 2 wheels" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("two versions", "two wheels of pkg-b: pkg_b-2.0-py3-none-any.whl and pkg_b-2.1-py3-none-any.whl"),
    ("unmet", "pkg-a needs pkg-c (neither carried nor in the image)"),
    ("av left out", "pkg-a needs av"),
    ("too big", "over the carry limit"),
], ids=["two-versions", "unmet", "av-left-out", "too-big"])
def test_each_problem_stops_the_script_naming_it(check, tmp_path, case, message):
    wheel(tmp_path, "pkg_a", "1.0", "pkg-b", *(["pkg-c"] if case == "unmet" else []), *(["av"] if case == "av left out" else []))
    wheel(tmp_path, "pkg_b", "2.0")
    if case == "two versions":
        wheel(tmp_path, "pkg_b", "2.1")
    # "av left out": the av wheel is not in the folder, which only --no-av accepts
    args = [str(tmp_path), *(["--limit-mib", "0.01"] if case == "too big" else [])]
    with pytest.raises(SystemExit) as stop:
        check(args)
    assert message in str(stop.value)
    if case == "av left out":
        assert check([*args, "--no-av"]) == 0
