"""The README's multi-node line, tried on one machine: two torchrun "nodes" of 2 ranks each on the
loopback address (static rendezvous: ``--master-addr``/``--master-port``), Wan tiny through USP
over all 4 ranks, equal to the single-process output; global rank 0 alone writes."""
import os
import subprocess
import sys

import pytest
import torch

import core
from core.parallel.launch import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_two_nodes_of_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "video.pt"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DITKIT_USP_TIMEOUT": "120"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n),
                               "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               str(ROOT / "tests" / "parallel" / "_multinode.py"), str(out)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    # ranks 0-1 ran on node 0, ranks 2-3 on node 1; one video, from global rank 0
    assert {f.name: f.read_text() for f in tmp_path.glob("ran-*")} == {"ran-0": "0", "ran-1": "0", "ran-2": "1", "ran-3": "1"}
    got = torch.load(out, weights_only=True)
    ref = core.load("wan2.1-t2v-1.3b", device="cpu")(
        "a red fox", num_inference_steps=2, height=48, width=80, num_frames=5, seed=5, guidance_scale=3.0).video
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5
