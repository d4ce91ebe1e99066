"""Fidelity of MOVA: the plugin's stages against the official sampling loop and scheduler run with
DiffSynth-Studio's modules (``plugins.mova.reference``, ``mova-360p``'s ``Conformance.reference``),
from the same weights and noise.

The call is the conformance call at 3 steps: 1000/3 is not an integer, so the official scheduler's
snapping to its training grid moves σ₁ and σ₂ off the shifted grid (asserted below: a sampler
without it fails at ``sigmas``), and the video towers switch after two steps (t = 1000, 909.1 ≥ 900,
then 714.3). Tolerances (errors measured on CPU, torch 2.13, in the comment):

* ``sigmas`` exact: both sides run the same float32 arithmetic (tests/mova/test_scheduler.py);
* ``text_embeddings`` ≤ 1e-5 · max: umT5 against transformers' UMT5 in float32 (measured 2.3e-7);
* ``velocity``, ``latents`` (video and audio), ``output`` and the waveform ≤ 1e-5 · max: the same
  float32 operations in another order (DiffSynth's towers, bridge and DAC, diffusers' VAE; both sides
  embed the timestep in float64) through three steps (measured at most 1.5e-6).
"""
from __future__ import annotations

import pytest
import torch

import core
from core.sampler import shifted_sigmas
from plugins.mova.reference import generate

from tests.reference_ladder import first_failure, ladder, stage_error, table

from . import refs

PROMPT = "a dog barks at a passing train"
TOLERANCES = {"text_embeddings": ("rel", 1e-5), "sigmas": ("abs", 0.0), "velocity": ("rel", 1e-5),
              "latents": ("rel", 1e-5), "output": ("rel", 1e-5)}


@pytest.fixture(scope="module")
def run():
    refs.diffsynth()  # installs the reference into .cache/mova-refs when missing (fails, never skips)
    pipe = core.load("mova-360p")
    call = pipe.resolve(prompt=PROMPT, seed=0, **{**pipe.spec.conformance.call, "num_inference_steps": 3})
    with pipe.tracing() as traced:
        output = pipe(progress=False, **call)
    return pipe, call, traced, output, generate(pipe, call, traced["noise"])


def test_every_stage_matches_the_official_sampler(run):
    pipe, call, traced, output, ref = run
    assert pipe.spec.conformance.reference == "plugins.mova.reference:reference"
    rows = ladder(traced, ref, TOLERANCES)
    samples = output.audio.shape[-1]
    audio = stage_error(output.audio, ref["audio"][..., :samples].clamp(-1, 1), "rel")
    print(f"\nmova-360p\n{table(rows)}\n  {'audio':16s} error {audio:.2e}  tolerance 1e-05")
    assert [r[0] for r in rows] == list(TOLERANCES)
    assert first_failure(rows) is None, table(rows)
    assert audio <= 1e-5


def test_the_call_reaches_snapping_and_the_expert_switch(run):
    _, call, _, _, ref = run
    exact = shifted_sigmas(3, 5.0)
    assert (ref["sigmas"] - exact).abs().max() > 5e-5  # the exact grid would fail the sigmas stage
    assert [t >= call["boundary"] * 1000 for t in ref["timesteps"].tolist()] == [True, True, False]


def test_a_missing_diffsynth_is_named_with_its_install_command(run, monkeypatch, tmp_path):
    import plugins.mova.reference as reference

    monkeypatch.setattr(reference, "REFS", tmp_path)
    pipe, call, traced, _, _ = run
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps --target .*diffsynth==2.1.12") as err:
        reference.reference(pipe, call, traced["noise"])
    assert err.value.name == "diffsynth"
