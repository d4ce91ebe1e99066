"""The same video tensor gives the same MP4 bytes in any process.

x264 reads heap memory it never wrote on some inputs, so the bytes depended on what earlier
allocations left behind (four ``ditkit run wan`` with one seed wrote 3 distinct files). Two
processes that start with different heap contents (glibc's ``MALLOC_PERTURB_``) stand in for two
processes with different histories; the videos are smooth frames with growing noise, a few of
which hit that read with the pinned PyAV/x264."""
from __future__ import annotations

import subprocess
import sys

import pytest

from core.heap_fill import fixed_heap_fill

from .conftest import ROOT, subprocess_env

_ENCODE = """
import hashlib, sys, torch
from core.outputs import Output, write_output
folder = sys.argv[1]
for seed in range(24):
    g = torch.Generator().manual_seed(seed)
    frames = 5
    video = torch.nn.functional.interpolate(torch.rand(1, 3, 1, 4, 4, generator=g).repeat(1, 1, frames, 1, 1),
                                            size=(frames, 32, 32), mode="trilinear")
    ramp = torch.linspace(0, 1, frames).view(1, 1, frames, 1, 1)
    video = (video + 0.15 * torch.rand(video.shape, generator=g) * ramp).clamp(0, 1)
    (path,) = write_output(Output(kind="video", video=video, fps=16.0), f"{folder}/{seed}.mp4")
    print(hashlib.sha256(path.read_bytes()).hexdigest()[:16])
"""


def test_mp4_bytes_do_not_depend_on_what_the_heap_held_before(tmp_path):
    with fixed_heap_fill() as effective:
        if not effective:
            pytest.skip("fixed heap contents need glibc's mallopt; identical MP4 bytes are not promised here")
    runs = []
    for perturb in ("0", "1"):  # fresh heap memory: whatever was there before, or bytes 0xFE
        folder = tmp_path / perturb
        folder.mkdir()
        runs.append(subprocess.Popen([sys.executable, "-c", _ENCODE, str(folder)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**subprocess_env(), "MALLOC_PERTURB_": perturb}))
    outs = []
    for proc in runs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        outs.append(out.split())
    assert len(outs[0]) == 24 and outs[0] == outs[1]
