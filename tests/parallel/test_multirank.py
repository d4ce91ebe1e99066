"""Parallel vs single-process parity on 2 and 4 CPU ranks (gloo), each world in one spawned job."""
import pytest

from core.parallel import launch

from . import _workers

pytestmark = pytest.mark.slow

TOL = _workers.FP32_TOL


def _assert_parity(results):
    errors = {k: v for k, v in results.items() if isinstance(v, float) and "bf16" not in k and "naive" not in k}
    assert errors and max(errors.values()) <= TOL, errors
    for name in ("noise diverged", "one ulp diverged"):
        assert "ranks diverged" in results[name]


def test_two_ranks():
    results = launch(_workers.world2, 2, timeout=120)
    _assert_parity(results)
    assert {k for k in results if k.startswith("raw u")} >= {f"raw u{u}r{r} L={n}" for u, r in [(2, 1), (1, 2)] for n in (8, 7, 5, 1)}
    assert max(v for k, v in results.items() if "bf16" in k) <= 1e-2
    assert results["naive zero padding"] > 1e-2  # the control: unmasked padding is wrong
    assert "zero log-sum-exp" in results["torch_math with ring"]
    assert any(k.startswith("joint text") for k in results) and any(k.startswith("towers audio") for k in results)


def test_four_ranks():
    results = launch(_workers.world4, 4, timeout=150)
    _assert_parity(results)
    for u, r in [(4, 1), (2, 2), (1, 4)]:
        for n in (8, 7, 5, 3):
            assert f"raw u{u}r{r} L={n}" in results
    assert "cfg cond u1r2x2 L=7" in results and "cfg uncond u1r2x2 L=7" in results
