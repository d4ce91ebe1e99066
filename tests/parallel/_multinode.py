"""Run by each worker of the two-"node" torchrun test: Wan tiny through USP (Ulysses 2 × ring 2
over the 4 ranks of both nodes); global rank 0 alone writes the video tensor."""
import os
import sys

import torch

import core

pipe = core.load("wan2.1-t2v-1.3b", device="cpu", use_usp=True, ulysses_degree=2, ring_degree=2)
out = pipe("a red fox", num_inference_steps=2, height=48, width=80, num_frames=5, seed=5, guidance_scale=3.0)
if pipe.parallel.is_main:
    torch.save(out.video, sys.argv[1])
with open(os.path.join(os.path.dirname(sys.argv[1]), f"ran-{os.environ['RANK']}"), "w") as f:
    f.write(os.environ["GROUP_RANK"] if "GROUP_RANK" in os.environ else "?")
