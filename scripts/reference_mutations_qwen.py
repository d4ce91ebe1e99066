"""By-hand proof that Qwen-Image's reference (diffusers' QwenImagePipeline) catches what the rest of
the kit cannot: three mutations of the plugin's pipeline, patched in this process one at a time,
each run through the kit's reference-parity check. Expected: the unmutated plugin passes; each
mutation fails, naming the stage where it enters. Output recorded in docs/fidelity.md.

    OMP_NUM_THREADS=1 python scripts/reference_mutations_qwen.py
"""
from __future__ import annotations

import contextlib
import sys

from core.pipeline import Pipeline
from core.sampler import dynamic_shift_sigmas
from core.testing import KitOptions, Subject, format_table, run_checks
from plugins.qwen_image.pipeline import QwenImagePipeline
from plugins.wan.vae import WanVAE


def wrong_terminal(self, num_inference_steps, height, width):  # the stretch to 0.025 instead of 0.02
    tokens = (height // 16) * (width // 16)
    return dynamic_shift_sigmas(num_inference_steps, tokens, shift_terminal=0.025)


def no_cfg_rescale(self, *args, **kwargs):  # plain CFG: the per-token norm rescale left out
    return Pipeline.denoise(self, *args, **{**kwargs, "cfg_rescale_dim": None})


MUTATIONS = {
    "none": (None, None, None),
    "schedule: shift_terminal 0.025": (QwenImagePipeline, "sigmas", wrong_terminal),
    "guidance: no CFG rescale": (QwenImagePipeline, "denoise", no_cfg_rescale),
    "decoding: latents not denormalised": (WanVAE, "denormalize_latents", lambda self, z: z),
}


@contextlib.contextmanager
def patched(cls, name, value):
    if cls is None:
        yield
        return
    saved = cls.__dict__.get(name)
    setattr(cls, name, value)
    try:
        yield
    finally:
        if saved is None:
            delattr(cls, name)
        else:
            setattr(cls, name, saved)


def main() -> int:
    ok = True
    for what, (cls, name, value) in MUTATIONS.items():
        with patched(cls, name, value):
            subject = Subject("qwen-image")
            (result,) = run_checks(subject, KitOptions(), pattern="reference-parity")
        print(f"# mutation: {what}")
        print(format_table(subject, [result]))
        ok &= (result.status == "pass") == (cls is None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
