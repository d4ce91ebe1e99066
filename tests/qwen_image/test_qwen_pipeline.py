"""Qwen-Image pipeline: schedule, prompt path and the whole generation against diffusers.

Reference: ``diffusers.QwenImagePipeline.from_pretrained`` on the tiny checkpoint our
checkpoint writer produced (so diffusers itself also reads the written layout: sharded
transformer, older-layout text encoder, diffusers-named VAE, tokenizer, scheduler config). Both
start from the same packed noise; fp32 on CPU; relative error ≤ 1e-5 on the final image. The
CFG case runs the prompt and the negative prompt " " (different token counts): diffusers encodes
each and masks nothing (batch of one); ours runs each branch at its own length.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import core
from core.errors import InputError
from core.sampler import noise
from plugins.qwen_image.dit import pack_latents
from plugins.qwen_image.pipeline import ASPECT_RATIOS
from plugins.qwen_image.plugin import SCHEDULER_CONFIG, write_checkpoint
from plugins.qwen_image.text_encoder import DROP_TOKENS, PROMPT_TEMPLATE

import diffusers  # noqa: E402  (the test extra: the parity reference)

PROMPT = "a lighthouse on a cliff at dusk"
REL_TOL = 1e-5


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def pipe():
    """The tiny pipeline with a stronger text path: with the default init the prompt moves the
    velocity by ~1 %, too little for the CFG rescale to show at 1e-5. Sharper attention (q/k norm
    weights ×3), larger text values and modulation make it ~20 %."""
    pipe = core.load("qwen-image", device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for block in pipe.transformer.transformer_blocks:
            attn = block.attn
            for norm in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k):
                norm.weight.mul_(3)
            attn.add_v_proj.weight.mul_(4)
            block.img_mod[1].weight.mul_(3)
    return pipe


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-ckpt")
    write_checkpoint(pipe, root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.QwenImagePipeline.from_pretrained(str(root), torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref


# ---------------------------------------------------------------------------------------- schedule


def test_schedule_test_vectors(pipe):
    """1328²: 6889 tokens, μ = 0.834325, σ = 1.0, 0.990988, 0.981768, …, 0.063783, 0.02, 0."""
    s = pipe.sigmas(50, 1328, 1328)
    assert s.shape == (51,)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert s[-2].item() == pytest.approx(0.02, abs=1e-7)
    for got, want in ((s[1], 0.990988), (s[2], 0.981768), (s[-3], 0.063783)):
        assert got.item() == pytest.approx(want, abs=1e-6)
    mu = 0.5 + (6889 - 256) * 0.4 / (8192 - 256)
    assert mu == pytest.approx(0.834325, abs=1e-6)
    assert 0.5 + (4096 - 256) * 0.4 / (8192 - 256) == pytest.approx(0.693548, abs=1e-6)


@pytest.mark.parametrize("steps,h,w", [(50, 1328, 1328), (30, 1024, 1024), (8, 928, 1664)])
def test_schedule_matches_diffusers_scheduler(pipe, steps, h, w):
    """The published scheduler config in diffusers' FlowMatchEulerDiscreteScheduler, driven as the
    diffusers pipeline drives it (sigmas linspace(1, 1/N, N), μ from the token count)."""
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
    tokens = (h // 16) * (w // 16)
    mu = calculate_shift(tokens, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"])
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.allclose(pipe.sigmas(steps, h, w), sched.sigmas.float(), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ prompt path


def test_tiny_tokenizer_prefix_is_the_dropped_34(pipe):
    """The template's system prefix (through ``user\\n``) is exactly the 34 dropped tokens."""
    tok = pipe.prompt_encoder.tokenizer
    ids = tok(PROMPT_TEMPLATE.format(PROMPT))["input_ids"]
    assert tok.decode(ids[:DROP_TOKENS]) == PROMPT_TEMPLATE.split("{}")[0]
    assert tok.decode(ids[DROP_TOKENS:]).startswith(PROMPT)


def test_prompt_embeddings_match_diffusers(pipe, reference):
    """Two prompts of different lengths, batched by diffusers (padded + mask): ours per prompt, real
    rows only, equal to diffusers' unmasked rows."""
    prompts = [PROMPT, "a cat"]
    embeds, mask = reference.encode_prompt(prompts, device="cpu")
    lengths = mask.sum(1).tolist()
    assert lengths[0] != lengths[1]
    for i, p in enumerate(prompts):
        ours = pipe.encode_prompt(p)
        assert ours.shape == (1, lengths[i], 32)
        assert _rel(ours[0], embeds[i, :lengths[i]]) <= REL_TOL


def test_long_prompts(pipe):
    """Past 512 tokens a warning (beyond the trained length); past 1024 an InputError."""
    with pytest.warns(UserWarning, match="512"):
        pipe.prompt_encoder.check("a " * 600)
    with pytest.raises(InputError, match="1024"):
        pipe("a " * 1100, num_inference_steps=1, progress=False)


# ------------------------------------------------------------------------------- whole generation


@pytest.mark.parametrize("h,w,cfg", [(48, 80, 4.0), (64, 32, 1.0)], ids=["15-tokens-true-cfg", "tall-no-cfg"])
def test_matches_diffusers_pipeline(pipe, reference, h, w, cfg):
    seed = 5
    ours = pipe(PROMPT, num_inference_steps=3, height=h, width=w, guidance_scale=cfg, seed=seed, progress=False).tensor()
    latents = pack_latents(noise((1, 16, h // 8, w // 8), seed))
    want = reference(PROMPT, negative_prompt=" ", true_cfg_scale=cfg, num_inference_steps=3, height=h, width=w,
                     latents=latents, output_type="pt").images
    assert ours.shape == want.shape == (1, 3, h, w)
    assert ours.std() > 0.01  # not a flat image
    assert _rel(ours, want) <= REL_TOL
    if cfg > 1:  # guidance (and so its rescale) matters at this size: CFG off differs by far more
        plain = pipe(PROMPT, num_inference_steps=3, height=h, width=w, guidance_scale=1.0, seed=seed, progress=False)
        assert _rel(plain.tensor(), want) > 0.05


def test_sizes_refused_before_any_work(pipe, monkeypatch):
    """A height or width that is not a multiple of 16 is an InputError before the text encoder runs."""
    calls = []
    monkeypatch.setattr(pipe.prompt_encoder, "encode", lambda *a, **k: calls.append(a))
    for size in ({"height": 40}, {"width": 1140}):
        with pytest.raises(InputError, match="multiple of 16"):
            pipe(PROMPT, progress=False, **size)
    assert not calls


def test_aspect_ratios(pipe):
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in ASPECT_RATIOS.values())
    args = pipe.resolve(prompt=PROMPT, aspect_ratio="16:9")
    assert (args["height"], args["width"]) == (928, 1664)
    assert math.isclose(1664 / 928, 16 / 9, rel_tol=0.01)
    with pytest.raises(InputError, match="aspect_ratio"):
        pipe.resolve(prompt=PROMPT, aspect_ratio="1:1", height=64)
