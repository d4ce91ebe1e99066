"""The pipeline base on the example plugin: inputs, determinism, progress, outputs."""
import io

import pytest
import torch

from core.errors import InputError
from core.outputs import Output, write_output

FAST = dict(num_inference_steps=2, progress=False)


@pytest.fixture
def pipe(example):
    return example.load("example-dit")


@pytest.mark.parametrize(
    "kwargs",
    [dict(prompt=""), dict(prompt="   "), dict(prompt="x" * 65), dict(prompt="a", num_inference_steps=0), dict(prompt="a", num_inference_steps=-2),
     dict(prompt="a", height=44), dict(prompt="a", width=0), dict(prompt="a", guidance_scale=-1.0),
     dict(prompt="a", seed="7"), dict(prompt="a", num_frames=5)],
)
def test_bad_inputs_raise_input_error(pipe, kwargs):
    prompt = kwargs.pop("prompt")
    with pytest.raises(InputError):
        pipe(prompt, progress=False, **kwargs)


def test_same_seed_same_output_different_seed_different_output(pipe):
    a = pipe("a fox", seed=1, **FAST).images
    b = pipe("a fox", seed=1, **FAST).images
    c = pipe("a fox", seed=2, **FAST).images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_output_kind_shape_dtype_range(pipe):
    out = pipe("a fox", height=48, width=80, **FAST)
    assert out.kind == "image" and out.images.shape == (1, 3, 48, 80) and out.images.dtype == torch.float32
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0


def test_guidance_changes_the_result_and_scale_one_skips_the_negative_branch(pipe):
    calls = []
    original = pipe.dit.forward
    pipe.dit.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    pipe("a fox", guidance_scale=1.0, **FAST)
    assert len(calls) == 2  # one model call per step
    calls.clear()
    pipe("a fox", guidance_scale=4.0, **FAST)
    assert len(calls) == 4


def test_progress_bar_is_shown_when_asked_and_hidden_otherwise(pipe, capsys):
    pipe("a fox", num_inference_steps=2, progress=True)
    assert "denoising" in capsys.readouterr().err
    pipe("a fox", num_inference_steps=2, progress=False)
    assert "denoising" not in capsys.readouterr().err


def test_tiny_weights_are_seeded_and_leave_the_global_rng_alone(example):
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    a = example.load("example-dit")
    assert torch.equal(torch.rand(1), expected)
    b = example.load("example-dit")
    assert torch.equal(a.dit.patch_embed.weight, b.dit.patch_embed.weight)


def test_write_output_checks_the_suffix(tmp_path):
    out = Output(kind="image", images=torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=".png"):
        write_output(out, tmp_path / "x.jpg")
    written = write_output(out, tmp_path / "x.png")
    assert [p.name for p in written] == ["x_0.png", "x_1.png"]


def test_diffusers_call_names_generator_and_close_match_suggestion(pipe):
    by_seed = pipe("a fox", seed=5, **FAST).images
    gen = torch.Generator().manual_seed(5)
    first = pipe("a fox", generator=gen, **FAST).images
    second = pipe("a fox", generator=gen, **FAST).images  # the generator advanced: new noise
    assert torch.equal(first, by_seed) and not torch.equal(second, first)
    with pytest.raises(InputError, match="did you mean 'num_inference_steps'"):
        pipe("a fox", num_inference_step=2, progress=False)
    with pytest.raises(InputError, match="generator"):
        pipe("a fox", generator=5, **FAST)


def test_to_casts_the_components_to_the_dtype(pipe):
    pipe.to("cpu", torch.float64)
    assert pipe.dtype == torch.float64
    assert {p.dtype for m in pipe.components().values() for p in m.parameters()} == {torch.float64}


def test_tracing_records_each_stage_only_inside_the_block(pipe):
    from core.pipeline import REFERENCE_STAGES

    with pipe.tracing() as trace:
        out = pipe("a fox", seed=3, guidance_scale=2.0, num_inference_steps=3, progress=False)
    assert set(trace) >= {"noise", "sigmas", "velocity", "latents", "output"} - {"text_embeddings"}
    assert set(trace) - {"noise"} <= set(REFERENCE_STAGES)
    assert trace["sigmas"].shape == (4,) and float(trace["sigmas"][-1]) == 0.0
    assert trace["velocity"].shape == trace["noise"].shape == trace["latents"].shape
    assert not torch.equal(trace["latents"], trace["noise"])
    assert torch.equal(trace["output"], out.images)
    assert pipe._trace is None
    pipe("a fox", seed=3, **FAST)  # outside the block: nothing recorded, nothing kept
    assert pipe._trace is None and len(trace) >= 5
