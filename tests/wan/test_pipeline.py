"""Wan pipelines end to end at tiny size: T2V, I2V, the two-expert switch, TI2V, input errors,
determinism, the output contract, the MP4/WAV writers and ``ditkit run wan``."""
from __future__ import annotations

import wave

import pytest
import torch

import core
import core.pipeline
import core.registry
import plugins.wan.plugin as wan_plugin
from core.outputs import Output, write_output
from plugins.wan.pipeline import NEGATIVE_PROMPT, expert_steps

import av  # noqa: E402  (a dependency: the MP4 writer)

MODELS = ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"]


@pytest.fixture(scope="module")
def registry():
    reg = core.registry.Registry(strict=True)
    reg.add_plugin(wan_plugin, name="wan", distribution="ditkit")
    return reg.collect()


@pytest.fixture(autouse=True)
def wan_only(registry, monkeypatch):
    monkeypatch.setattr(core.registry, "_registry", registry)


@pytest.fixture(scope="module")
def pipes(registry):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core.registry, "_registry", registry)
        return {name: core.load(name, device="cpu") for name in ("wan", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b")}


def image(h=32, w=32, seed=0):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def calls(module, record):
    """Record every forward of ``module`` as (name, t, y) while the hook is installed."""
    def hook(mod, args, kwargs):
        record.append((mod, args[1].clone(), kwargs.get("y")))
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_every_model_is_registered_with_its_declarations(registry):
    assert [r.spec.name for r in registry.models()] == sorted(MODELS)
    assert registry.model("wan").spec.name == "wan2.1-t2v-1.3b"
    for name in MODELS:
        spec = registry.model(name).spec
        assert set(spec.presets) == {"tiny", "small", "official"} and not spec.presets["official"].random_weights
        two = name.endswith("a14b")
        dits = ["dit", "dit_low"] if two else ["dit"]
        assert spec.compilable_models == dits
        assert spec.repeated_blocks == {d: ["WanAttentionBlock"] for d in dits}
        assert [a.component for a in spec.usp] == dits
        per_token = any(s.module == "time_features" for s in spec.usp[0].splits)
        assert per_token == (name == "wan2.2-ti2v-5b")
        assert spec.capabilities.output == "video" and spec.capabilities.usp
        assert spec.capabilities.image_input == ("i2v" in name)
        assert spec.capabilities.size_multiple == (32 if "ti2v" in name else 16)
        paths = [f.path for f in spec.weights.files]
        assert ("Wan2.2_VAE.pth" if "ti2v" in name else "Wan2.1_VAE.pth") in paths
        assert ("high_noise_model/diffusion_pytorch_model.safetensors" in paths) == two
    a14b = registry.model("wan2.2-t2v-a14b").spec.presets["official"].defaults
    assert (a14b["num_inference_steps"], a14b["shift"], a14b["boundary"], a14b["guidance_scale"], a14b["guidance_scale_low"]) == (40, 12.0, 0.875, 4.0, 3.0)
    ti2v = registry.model("wan2.2-ti2v-5b").spec.presets["official"].defaults
    assert (ti2v["width"], ti2v["height"], ti2v["num_frames"], ti2v["fps"]) == (1280, 704, 121, 24)


def test_t2v_output_contract_and_determinism(pipes):
    pipe = pipes["wan"]
    out = pipe("a red fox in the snow", seed=3)
    assert out.kind == "video" and out.fps == 16
    v = out.video
    assert v.shape == (1, 3, 5, 32, 32) and v.dtype == torch.float32
    assert torch.isfinite(v).all() and v.min() >= 0 and v.max() <= 1 and v.std() > 0
    assert torch.equal(v, pipe("a red fox in the snow", seed=3).video)
    assert not torch.equal(v, pipe("a red fox in the snow", seed=4).video)
    assert not torch.equal(v, pipe("a blue bird", seed=3).video)
    wide = pipe("a red fox", seed=0, height=32, width=48, num_frames=9)
    assert wide.video.shape == (1, 3, 9, 32, 48)
    # the latent (4x6) fits in one default tile, so the tiled decode is the untiled one
    assert torch.equal(pipe("a red fox", seed=0, height=32, width=48, num_frames=9, tiled=True).video, wide.video)


def test_default_negative_prompt_is_the_official_one(pipes, monkeypatch):
    pipe = pipes["wan"]
    seen = []
    monkeypatch.setattr(pipe, "encode_prompt", lambda text: seen.append(text) or torch.zeros(1, 512, 32))
    pipe("a cat", seed=0, num_inference_steps=1)
    assert seen == ["a cat", NEGATIVE_PROMPT]
    assert NEGATIVE_PROMPT.startswith("色调艳丽") and NEGATIVE_PROMPT.endswith("倒着走")


def test_two_experts_switch_at_the_boundary_with_their_own_cfg_scale(pipes, monkeypatch):
    pipe = pipes["wan2.2-t2v-a14b"]
    record, scales = [], []
    hooks = [calls(pipe.dit, record), calls(pipe.dit_low, record)]
    real_guide = core.pipeline.guide
    monkeypatch.setattr(core.pipeline, "guide", lambda c, u, s, d=None: scales.append(s) or real_guide(c, u, s, d))
    try:
        # shift 12, 4 steps: σ = 1, 0.973, 0.923, 0.8 -> t ≥ 875 for the first three steps
        pipe("a cat", seed=0, num_inference_steps=4, shift=12.0, boundary=0.875, guidance_scale=4.0, guidance_scale_low=3.0)
    finally:
        for h in hooks:
            h.remove()
    assert expert_steps(4, 12.0, 0.875) == ["dit", "dit", "dit", "dit_low"]
    ran = ["dit" if m is pipe.dit else "dit_low" for m, _, _ in record]
    assert ran == ["dit"] * 6 + ["dit_low"] * 2  # cond + uncond per step
    ts = [float(t) for _, t, _ in record[::2]]
    assert all(t >= 875 for t in ts[:3]) and ts[3] < 875
    assert scales == [4.0, 4.0, 4.0, 3.0]
    # the official 40-step schedules (docs/models.md, Wan pipeline)
    assert expert_steps(40, 12.0, 0.875).count("dit") == 26
    assert expert_steps(40, 5.0, 0.9).count("dit") == 15


def test_one_guidance_scale_applies_to_both_experts(pipes):
    args = pipes["wan2.2-t2v-a14b"].resolve(prompt="x", guidance_scale=2.0)
    assert args["guidance_scale"] == args["guidance_scale_low"] == 2.0
    args = pipes["wan2.2-t2v-a14b"].resolve(prompt="x")
    assert (args["guidance_scale"], args["guidance_scale_low"]) == (4.0, 3.0)


def test_i2v_conditions_through_the_vae(pipes):
    pipe = pipes["wan2.2-i2v-a14b"]
    record = []
    hooks = [calls(pipe.dit, record), calls(pipe.dit_low, record)]
    try:
        out = pipe("a cat", seed=0, image=image(40, 36))  # resized to cover 32x32, center-cropped
    finally:
        for h in hooks:
            h.remove()
    assert out.video.shape == (1, 3, 5, 32, 32) and 0 <= out.video.min() and out.video.max() <= 1
    y = record[0][2]
    assert y.shape == (1, 20, 2, 4, 4)  # mask 4 + image latents 16, T = (5-1)/4 + 1
    assert torch.all(y[:, :4, 0] == 1) and torch.all(y[:, :4, 1:] == 0)
    assert all(torch.equal(r[2], y) for r in record)
    from PIL import Image

    pil = Image.fromarray((image(32, 32, seed=1).permute(1, 2, 0) * 255).round().byte().numpy())
    other = pipe("a cat", seed=0, image=pil)
    assert not torch.equal(other.video, out.video)
    assert torch.equal(pipe("a cat", seed=0, image=image(40, 36)).video, out.video)


def test_ti2v_per_token_timesteps_and_fixed_first_frame(pipes, monkeypatch):
    pipe = pipes["wan2.2-ti2v-5b"]
    record, decoded = [], []
    real_decode = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda x, tiled=False: decoded.append(x.clone()) or real_decode(x, tiled))
    hook = calls(pipe.dit, record)
    try:
        t2v = pipe("a cat", seed=0)
        img = image(64, 64)
        i2v = pipe("a cat", seed=0, image=img)
    finally:
        hook.remove()
    assert t2v.video.shape == i2v.video.shape == (1, 3, 5, 64, 64) and t2v.fps == 24
    tokens_per_frame, frames = (64 // 32) ** 2, 2
    t_t2v, t_i2v = record[0][1], record[len(record) // 2][1]
    assert t_t2v.shape == t_i2v.shape == (1, frames * tokens_per_frame)
    assert torch.all(t_t2v == 1000.0)  # σ_0 = 1
    assert torch.all(t_i2v[:, :tokens_per_frame] == 0) and torch.all(t_i2v[:, tokens_per_frame:] == 1000.0)
    z0 = pipe.encode_image(img, 5, 64, 64)
    assert z0.shape == (1, 48, 1, 4, 4)
    assert torch.equal(decoded[1][:, :, :1], z0)  # frame 0 stays the clean image latent
    assert not torch.equal(decoded[0][:, :, :1], z0)


@pytest.mark.parametrize("model, kwargs", [
    ("wan", {"num_frames": 6}),
    ("wan", {"num_frames": 0}),
    ("wan", {"height": 40}),
    ("wan", {"width": 24}),
    ("wan2.2-ti2v-5b", {"height": 48}),  # a multiple of 16 but not of 32
    ("wan", {"image": torch.rand(3, 32, 32)}),  # text-only model
    ("wan2.2-i2v-a14b", {}),  # image missing
    ("wan2.2-i2v-a14b", {"image": torch.rand(3, 32, 32) * 2}),  # outside [0, 1]
    ("wan2.2-i2v-a14b", {"image": torch.rand(2, 3, 32, 32)}),
    ("wan2.2-t2v-a14b", {"boundary": 1.5}),
    ("wan", {"frames": 5}),  # unknown argument
    ("wan", {"negative_prompt": "word " * 600}),  # over 512 umT5 tokens
])
def test_bad_inputs_fail_before_any_work(pipes, model, kwargs):
    pipe = pipes[model]
    record = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda *a: record.append(1))
    try:
        with pytest.raises(core.InputError):
            pipe("a cat", seed=0, **kwargs)
    finally:
        hook.remove()
    assert record == []


def test_real_preset_needs_weights():
    with pytest.raises(core.WeightsError):
        core.load("wan2.2-t2v-a14b", preset="official", device="cpu")


def test_mp4_writer_round_trip(pipes, tmp_path):
    out = pipes["wan"]("a red fox", seed=0, height=32, width=48, num_frames=9)
    [path] = write_output(out, tmp_path / "fox.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert float(stream.average_rate) == 16
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    expected = (out.video[0, :, 0].permute(1, 2, 0) * 255).numpy()
    assert abs(frames[0].astype(float) - expected).mean() < 20  # lossy, but the same picture
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.mp4"]  # written atomically, no leftovers
    with pytest.raises(ValueError):
        write_output(out, tmp_path / "fox.png")


def test_mp4_with_audio_and_wav(tmp_path):
    video = torch.rand(1, 3, 5, 16, 16)
    audio = (torch.sin(torch.arange(16000) / 10.0) * 0.5)[None, None].repeat(1, 2, 1)
    [path] = write_output(Output(kind="video+audio", video=video, audio=audio, fps=24.0, sample_rate=16000), tmp_path / "a.mp4")
    with av.open(str(path)) as container:
        assert sorted(s.type for s in container.streams) == ["audio", "video"]
        assert container.streams.audio[0].codec_context.name == "aac"
        assert container.streams.audio[0].rate == 16000
        assert sum(1 for _ in container.decode(video=0)) == 5
    [wav] = write_output(Output(kind="audio", audio=audio, sample_rate=16000), tmp_path / "a.wav")
    with wave.open(str(wav)) as f:
        assert (f.getnchannels(), f.getframerate(), f.getnframes(), f.getsampwidth()) == (2, 16000, 16000, 2)


def test_cli_run_writes_an_mp4(tmp_path, capsys):
    from core.cli import main

    target = tmp_path / "x.mp4"
    assert main(["run", "wan", "--out", str(target), "--no-progress", "--steps", "2", "--device", "cpu"]) == 0
    with av.open(str(target)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    assert "wrote" in capsys.readouterr().out


def test_cli_image_to_video_reads_the_image_and_frame_count(tmp_path, capsys):
    from PIL import Image

    from core.cli import main

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "in.png")
    target = tmp_path / "i2v.mp4"
    assert main(["run", "wan2.2-i2v-a14b", "--image", str(tmp_path / "in.png"), "--num-frames", "9", "--height", "32",
                 "--width", "48", "--steps", "2", "--out", str(target), "--no-progress", "--device", "cpu"]) == 0
    with av.open(str(target)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (48, 32)
        assert sum(1 for _ in container.decode(video=0)) == 9
    assert main(["run", "wan2.2-i2v-a14b", "--image", str(tmp_path / "missing.png"), "--out", str(target)]) == 2
    assert "missing.png" in capsys.readouterr().err


def measure_vae_compile() -> None:
    """``python tests/wan/test_pipeline.py vae-compile``: why the VAE is not declared compilable
    (plugins/wan/README.md). Not a test: minutes on a CPU."""
    import time

    import torch._dynamo

    from plugins.wan.vae import WAN21_VAE_TINY_CONFIG, WanVAE

    vae = WanVAE(**WAN21_VAE_TINY_CONFIG).eval()
    z = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        explained = torch._dynamo.explain(vae.decode)(z)
        print(f"decode: {explained.graph_count} graph(s), {explained.graph_break_count} graph break(s)")
        torch._dynamo.reset()
        decode = torch.compile(WanVAE.decode, backend="aot_eager", dynamic=True)
        start = time.perf_counter()
        decode(vae, z)
        print(f"decode, 2 latent frames, backend aot_eager: first call {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["vae-compile"]:
        measure_vae_compile()
