"""scripts/attention_kernels.py's exactness gate and the fa4 kernel plugin (plugins/kernels), on the CPU."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import core
from core import attention

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(ROOT / "scripts" / "attention_kernels.py"))


def _uniform(q, k, v, *, mask=None, scale=None):
    """Deliberately inexact and faster than any real kernel: every query gets the mean value."""
    return v.mean(dim=2, keepdim=True).expand(*q.shape[:3], v.shape[-1])


def _slightly_off(q, k, v, *, mask=None, scale=None):
    """SDPA scaled by 1.03: the size of error an FP8 kernel makes, above bf16's tolerance."""
    return attention.sdpa(q, k, v, mask=mask, scale=scale) * 1.03


def test_an_inexact_kernel_is_never_timed_nor_chosen_even_when_fastest(script, monkeypatch, tmp_path):
    monkeypatch.setitem(attention._KERNELS, "uniform-test", _uniform)
    monkeypatch.setitem(attention._KERNELS, "off-test", _slightly_off)
    out = tmp_path / "attention.json"
    assert script["main"](["--device", "cpu", "--tiny", "--kernels", "sdpa,sdpa-flash,uniform-test,off-test",
                           "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["reference"] == "sdpa-math in float32" and report["dtype"] == "bfloat16"
    for shape in report["shapes"]:
        rows = {r["kernel"]: r for r in shape["kernels"]}
        for bad in ("uniform-test", "off-test"):
            assert rows[bad]["status"] == "inexact" and "median_ms" not in rows[bad]
            assert rows[bad]["error_rel"] > shape["tolerance"]
        for good in ("sdpa", "sdpa-flash"):
            assert rows[good]["status"] == "exact" and rows[good]["error_rel"] < shape["tolerance"]
            assert rows[good]["min_ms"] <= rows[good]["median_ms"] <= rows[good]["max_ms"]
        assert shape["chosen"] in ("sdpa", "sdpa-flash")
    assert report["fa4"]["registered"] is False and "not installed" in report["fa4"]["reason"]


def test_a_kernel_that_raises_is_unavailable_and_a_shape_without_exact_kernel_fails(script, monkeypatch, tmp_path):
    def broken(q, k, v, *, mask=None, scale=None):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setitem(attention._KERNELS, "broken-test", broken)
    monkeypatch.setitem(attention._KERNELS, "uniform-test", _uniform)
    out = tmp_path / "a.json"
    assert script["main"](["--device", "cpu", "--tiny", "--kernels", "broken-test,uniform-test", "--json", str(out)]) == 1
    shape = json.loads(out.read_text())["shapes"][0]
    assert shape["chosen"] is None
    assert shape["kernels"][0]["status"] == "unavailable" and "no kernel" in shape["kernels"][0]["reason"]


def test_the_reference_in_query_chunks_equals_one_call(script):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (37, 23, 23))
    whole = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    chunked = script["reference"](q, k, v, chunk_bytes=4 * 2 * 23 * 5)  # 5 query rows per chunk, uneven
    assert torch.allclose(chunked, whole, atol=1e-6, rtol=1e-5)
    # bf16 inputs (what the kernels get) are compared against math in float32, not in bf16
    q, k, v = (t.bfloat16() for t in (q, k, v))
    ref = script["reference"](q, k, v)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    assert ref.dtype == torch.float32 and torch.allclose(ref, exact, atol=1e-5, rtol=1e-5)


def test_fa4_plugin_registers_nothing_without_flash_attn_4():
    registry = core.registry.get_registry()
    (info,) = [p for p in registry.plugins() if p.name == "kernels"]  # the built-in entry point
    assert info.distribution == "ditkit" and info.hooks == ("ditkit_register_attention_kernels",)
    assert not [f for f in registry.failures if f.plugin == "kernels"]
    from plugins.kernels import fa4, plugin

    assert not fa4.available() and plugin.ditkit_register_attention_kernels() == []
    assert "fa4" not in attention.available_kernels()


@pytest.fixture
def fake_fa4(tmp_path, monkeypatch):
    """A stand-in ``flash_attn.cute`` (FlashAttention's (B, L, H, D) layout, returns (out, lse))."""
    pkg = tmp_path / "flash_attn" / "cute"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import torch.nn.functional as F\n"
        "calls = []\n"
        "def flash_attn_func(q, k, v, softmax_scale=None, causal=False):\n"
        "    calls.append(tuple(q.shape))\n"
        "    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)\n"
        "    return out.transpose(1, 2), None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]


def test_fa4_plugin_registers_fa4_where_flash_attn_cute_is_installed(fake_fa4):
    from plugins.kernels import fa4, plugin

    assert fa4.available()
    (spec,) = plugin.ditkit_register_attention_kernels()
    assert spec.name == "fa4" and spec.kernel is fa4.fa4_attention


def test_fa4_kernel_passes_flash_attention_layout_and_scale(fake_fa4):
    from plugins.kernels import fa4

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen) for n in (11, 7, 7))  # (B, H, L, D), Lq != Lk
    got = fa4.flash(q, k, v, scale=0.3)
    import flash_attn.cute as cute

    assert cute.calls == [(2, 11, 3, 16)]  # FlashAttention saw (B, L, H, D)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, scale=0.3))
    # a masked or float32 or CPU call goes to SDPA, never to FA4
    mask = torch.rand(11, 7, generator=gen) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(fa4.fa4_attention(q, k, v, mask=mask, scale=None),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert cute.calls == [(2, 11, 3, 16)]


class _ReportsCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: fa4_attention's routing, checked without a GPU."""

    @property
    def is_cuda(self):
        return True


def test_fa4_kernel_sends_only_unmasked_half_precision_cuda_calls_to_fa4(fake_fa4, monkeypatch):
    from plugins.kernels import fa4
    import flash_attn.cute as cute

    to_sdpa = []
    monkeypatch.setattr(attention, "sdpa", lambda q, k, v, *, mask=None, scale=None:
                        to_sdpa.append((q.dtype, q.is_cuda, mask is not None)) or q)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    cuda = [t.as_subclass(_ReportsCuda) for t in (q, k, v)]
    fa4.fa4_attention(*cuda, mask=torch.ones(8, 8, dtype=torch.bool))  # masked
    fa4.fa4_attention(q, k, v)  # on the CPU
    fa4.fa4_attention(*(t.float() for t in cuda))  # float32
    assert to_sdpa == [(torch.bfloat16, True, True), (torch.bfloat16, False, False), (torch.float32, True, False)]
    assert cute.calls == []
    fa4.fa4_attention(*cuda)  # unmasked bf16 on CUDA: the one call FA4 gets
    assert cute.calls == [(1, 8, 2, 16)] and len(to_sdpa) == 3
