"""scripts/gpu_smoke_usp.py's LSE and ring-merge checks, run with the CPU kernel (the GPU run uses
the CUDA kernel; see the script). A zero LSE (yunchang TORCH_MATH's bug) must fail them."""
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_smoke_usp.py"


@pytest.fixture(scope="module")
def smoke():
    return runpy.run_path(str(SCRIPT))


def test_cpu_kernel_lse_and_ring_merge_of_uneven_chunks_are_exact(smoke, capsys):
    assert smoke["main"](["--device", "cpu", "--small"]) == 0
    out = capsys.readouterr().out
    assert "ring-merge float32 keys 29+22" in out and "ring-merge bfloat16" in out and "6 passed, 0 failed" in out


def test_a_wrong_lse_fails_the_lse_and_ring_merge_checks(smoke, capsys):
    assert smoke["main"](["--device", "cpu", "--small", "--break-lse"]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert any("lse float32" in line for line in failed) and any("ring-merge float32" in line for line in failed)
