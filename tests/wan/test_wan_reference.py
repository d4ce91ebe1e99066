"""Fidelity of every Wan variant: the plugin's stages against diffusers' own Wan pipelines
(``plugins.wan.reference``, each variant's ``Conformance.reference``), from the same weights and noise.

One tiny generation per variant (the conformance call at 3 steps: both experts run on the A14B
models), compared stage by stage in ladder order. Tolerances (errors measured on CPU, torch 2.13,
diffusers 0.42.1, in the comment):

* ``text_embeddings`` ≤ 1e-5 · max (float32 rounding; umT5 vs transformers' UMT5, as in
  tests/wan/test_text_encoder.py; measured 1.4e-7);
* ``sigmas`` ≤ 1e-6 absolute (diffusers shifts the grid in float32, ditkit in float64 and rounds once:
  one float32 ulp; measured 6.0e-8);
* ``velocity``, ``latents``, ``output`` ≤ 1e-4 · max: float32 rounding through the DiT, the VAE and
  three Euler steps, plus diffusers' float32 timestep features against the official float64 ones
  (tests/wan/test_dit.py); measured at most 3.3e-6, 30× below.

The mutations below break, one at a time, the schedule's shift, the guidance formula and the VAE's
latent denormalisation in the plugin, and require the ladder to fail first at the stage that
mechanism produces (every earlier stage still passing).
"""
from __future__ import annotations

import functools

import pytest
import torch

import core
from plugins.wan.pipeline import expert_steps
from plugins.wan.reference import reference

from tests.reference_ladder import first_failure, ladder, table

VARIANTS = ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"]
PROMPT = "a red fox running through snow"
TOLERANCES = {"text_embeddings": ("rel", 1e-5), "sigmas": ("abs", 1e-6), "velocity": ("rel", 1e-4),
              "latents": ("rel", 1e-4), "output": ("rel", 1e-4)}


def _call(pipe) -> dict:
    return pipe.resolve(prompt=PROMPT, seed=0, **{**pipe.spec.conformance.call, "num_inference_steps": 3})


def _traced(pipe, call) -> dict:
    with pipe.tracing() as trace:
        pipe(progress=False, **call)
    return trace


@functools.cache
def _run(name: str):
    """(pipe, call, traced stages, reference stages) of one variant, computed once per session."""
    pipe = core.load(name)
    call = _call(pipe)
    traced = _traced(pipe, call)
    return pipe, call, traced, reference(pipe, call, traced["noise"])


@pytest.mark.parametrize("name", VARIANTS)
def test_every_stage_matches_diffusers(name):
    pipe, call, traced, ref = _run(name)
    if pipe.two_experts:  # the call exercises the expert switch and both guidance scales
        assert set(expert_steps(3, call["shift"], call["boundary"])) == {"dit", "dit_low"}
        assert call["guidance_scale"] != call["guidance_scale_low"] or pipe.task == "i2v"
    rows = ladder(traced, ref, TOLERANCES)
    print(f"\n{name}\n{table(rows)}")
    assert [r[0] for r in rows] == list(TOLERANCES)
    assert first_failure(rows) is None, table(rows)


def _wrong_shift(monkeypatch):
    import plugins.wan.pipeline as wan_pipeline

    right = wan_pipeline.shifted_sigmas
    monkeypatch.setattr(wan_pipeline, "shifted_sigmas", lambda steps, shift, s_max=1.0: right(steps, shift + 1.0, s_max))


def _wrong_guidance(monkeypatch):
    import core.pipeline

    monkeypatch.setattr(core.pipeline, "guide", lambda v_pos, v_neg, scale, rescale_dim=None: v_pos + scale * (v_pos - v_neg))


def _no_denormalisation(monkeypatch):
    from plugins.wan.vae import WanVAE

    monkeypatch.setattr(WanVAE, "denormalize_latents", lambda self, z: z)


@pytest.mark.parametrize("mutate,stage", [(_wrong_shift, "sigmas"), (_wrong_guidance, "latents"),
                                          (_no_denormalisation, "output")],
                         ids=["shift+1", "guidance v_pos+s(v_pos-v_neg)", "vae-skips-denormalisation"])
def test_a_broken_mechanism_fails_at_its_stage(monkeypatch, mutate, stage):
    pipe, call, _, ref = _run("wan2.1-t2v-1.3b")
    mutate(monkeypatch)
    rows = ladder(_traced(pipe, call), ref, TOLERANCES)
    print(f"\n{stage}\n{table(rows)}")
    assert first_failure(rows) == stage, table(rows)


def test_a_missing_diffusers_is_named(monkeypatch):
    import sys

    pipe, call, traced, _ = _run("wan2.1-t2v-1.3b")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what `import diffusers` meets when it is not installed
    with pytest.raises(ModuleNotFoundError, match="diffusers") as err:
        reference(pipe, call, traced["noise"])
    assert err.value.name == "diffusers"
