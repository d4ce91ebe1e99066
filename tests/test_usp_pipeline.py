"""USP through core.load(use_usp=True) on the example plugin: 2 and 4 gloo ranks."""
import subprocess
import sys

import pytest

from core.errors import InputError, RankFailed
from core.parallel import launch

from . import usp_workers
from .conftest import subprocess_env

pytestmark = pytest.mark.slow
TOL = 1e-5  # fp32; observed ≈1e-7 (reduction order of the ring merge and all-to-all)


def _assert_sharded(results, tag, world):
    """Sharded weights (core.parallel.weight_shards): exact on an uneven length, 1/N of the DiT per
    rank (up to FSDP's padding of each parameter to equal shards), one block gathered at a time."""
    assert results[f"{tag} sharded vs unsharded uneven (bitwise)"] == 0.0, results
    assert results[f"{tag} sharded vs one process uneven"] <= TOL and results[f"{tag} sharded vs one process even"] <= TOL
    assert results[f"{tag} dit bytes on this rank / whole"] <= 1 / world + 0.02, results
    assert results[f"{tag} most gathered at a block / whole"] < 0.5, results


def test_four_ranks_ulysses_ring_and_cfg_parallel_equal_one_process(example_site):
    results = launch(usp_workers.four_ranks, 4, args=(str(example_site),), timeout=240)
    errors = {k: v for k, v in results.items() if "cfg=" in k}
    assert len(errors) == 8 and max(errors.values()) <= TOL, results
    _assert_sharded(results, "u2 r2", 4)


def test_compile_with_usp_equals_eager_usp_without_recompiling_and_divergence_is_caught(example_site):
    # (and block / model offload under USP equal USP without offload, bit for bit; so do sharded
    # weights under block offload, their blocks' shards in host memory, the DiT left to FSDP)
    results = launch(usp_workers.compile_and_diverge, 2, args=(str(example_site),), timeout=400)
    assert results["compile+usp vs eager+usp"] <= TOL, results
    assert results["usp+block offload equals usp"] and results["usp+model offload equals usp"], results
    assert results["usp+shard+block equals usp (bitwise)"], results
    assert results["usp+shard+block fsdp offload policies"] == {"root": ["OffloadPolicy"],
                                                                 "blocks": ["CPUOffloadPolicy"]}, results
    assert results["usp+shard+block left to fsdp"] == (["dit"], []), results
    assert results["recompiled"] == "no", results["recompiled"]
    assert "ranks diverged" in results["divergence"], results["divergence"]
    _assert_sharded(results, "u1 r2", 2)
    assert results["compile+shard vs eager+usp"] <= TOL, results
    assert results["compile+shard graphs per block class"] == {"JointBlock": 1, "SingleBlock": 1}, results
    assert results["compile+shard recompiled"] == "no", results["compile+shard recompiled"]
    # LoRA under USP (the same job): every rank fuses the same weights, checked by one all-gather
    assert results["lora compile+usp vs eager+usp"] <= TOL and results["lora rescaled compile+usp vs eager+usp"] <= TOL
    assert results["lora recompiled"] == "no", results["lora recompiled"]
    assert "ranks diverged: weights after set_lora_scale('style')" in results["lora divergence"], results
    assert "LoRA on weights sharded across ranks (shard_weights=True) is not supported" in results["lora on sharded weights"]


def test_a_failing_rank_ends_the_run_with_its_error(example_site):
    with pytest.raises(RankFailed) as info:
        launch(usp_workers.failing_rank, 2, args=(str(example_site),), timeout=120)
    assert info.value.rank == 1 and "rank 1 fell over" in str(info.value)


def test_ditkit_run_nproc_writes_one_file_from_rank_zero(example_site, tmp_path):
    out = tmp_path / "usp.png"
    res = subprocess.run([sys.executable, "-m", "core.cli", "run", "example", "--nproc", "2", "--steps", "2",
                          "--height", "48", "--width", "112", "--shard-weights", "--out", str(out)],
                         capture_output=True, text=True, env=subprocess_env(example_site), timeout=240)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("wrote") == 1 and out.is_file()
    # rank 0 reports what it holds of the sharded DiT: half of it on 2 ranks
    assert res.stdout.count("weights sharded over 2 ranks") == 1 and "dit 0.594 MB of 1.19 MB (4 blocks)" in res.stdout, res.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["usp.png"]


def test_head_count_the_ulysses_degree_does_not_divide_is_an_error_before_any_work():
    from core.errors import ParallelError
    from core.parallel import plan_degrees

    with pytest.raises(ParallelError, match=r"valid"):
        plan_degrees(4, 6, 4, 1, False)


def test_sharded_weights_without_usp_are_refused(example):
    # without use_usp there are no ranks to shard over: an error, never a silently whole model
    with pytest.raises(InputError, match=r"shard_weights=True needs use_usp=True"):
        example.load("example-dit", shard_weights=True)
