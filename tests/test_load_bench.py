"""ditkit bench NAME --weights DIR --load: load seconds against a raw read of the same files from a
cold page cache, and peak RSS against the weights' bytes (tiny checkpoint: the numbers are noise,
the mechanism is what is tested; docs/PERFORMANCE.md has the real-size figures)."""
import json

import pytest

from core.errors import InputError


def test_load_bench_reports_rates_and_memory_from_a_cold_cache(example, tmp_path, capsys):
    from core.cli import main
    from core.load_bench import cached_fraction, checkpoint_files

    from .test_weights import write_checkpoint

    root = write_checkpoint(tmp_path / "ckpt", example.load("example-dit"))
    out = tmp_path / "load.json"
    assert main(["bench", "example", "--weights", str(root), "--load", "--repeats", "1", "--threads", "1",
                 "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    files = checkpoint_files(example.get_registry().model("example").spec, root)
    assert report["files"] == [str(p) for p in files] and report["file_bytes"] == sum(p.stat().st_size for p in files)
    assert report["cache_drop"].startswith("posix_fadvise") and report["cached_after_drop_max"] == 0.0
    (load,) = report["load"]
    # the child loaded every byte of tensor data once (each file: an 8-byte length and a JSON header besides)
    assert load["reader"]["bytes_read"] == load["loaded_bytes"] <= report["file_bytes"]
    assert load["rate_vs_raw"] > 0 and load["seconds"]["min"] > 0
    # the same bytes, so the rate ratio is the raw read's median time over the load's (one run each)
    assert load["rate_vs_raw"] == pytest.approx(report["raw_read"]["seconds"]["median"] / load["seconds"]["median"])
    # the loaded tensors are resident when the load returns: the peak above the start holds at least them
    assert load["peak_rss_increase_bytes"] >= load["loaded_bytes"] > 0
    assert load["peak_rss_vs_weights"] == load["peak_rss_increase_bytes"] / load["loaded_bytes"]
    assert cached_fraction(files) is not None
    assert "x raw" in capsys.readouterr().out


def test_weights_without_load_is_a_usage_error(example, tmp_path):
    from core.cli import main

    assert main(["bench", "example", "--weights", str(tmp_path)]) == 2
