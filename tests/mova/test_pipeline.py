"""The MOVA pipeline end to end at tiny shapes, its official checkpoint layout, key-set
fingerprints of the release configs, input checks and the mesh's head-count rule."""
from __future__ import annotations

import json
import math

import pytest
import torch

import core
from core.errors import InputError, ParallelError, WeightsError
from core.parallel import plan_degrees
from plugins.mova.pipeline import audio_lengths
from plugins.mova.plugin import FOLDERS, MODEL_FILE, TEXT_ENCODER_FILE, write_checkpoint
from tests.fingerprints import fingerprint

IMAGE = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0))
CALL = dict(image=IMAGE, num_frames=9, num_inference_steps=2, seed=0, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return core.load("mova", device="cpu")


@pytest.fixture(scope="module")
def output(pipe):
    return pipe("a dog barks at a passing train", **CALL)


def test_registered_models_and_presets():
    names = {m.spec.name: m.spec for m in core.get_registry().models()}
    for name in ("mova-360p", "mova-720p"):
        assert set(names[name].presets) == {"tiny", "official"}
    assert core.get_registry().model("mova").spec.name == "mova-360p"
    assert names["mova-360p"].presets["official"].defaults["height"] == 352
    assert names["mova-720p"].presets["official"].defaults["width"] == 1280


def test_tiny_end_to_end_video_and_waveform(output):
    assert output.kind == "video+audio" and output.fps == 24.0 and output.sample_rate == 48000
    assert output.video.shape == (1, 3, 9, 32, 32) and output.video.dtype == torch.float32
    assert 0.0 <= output.video.min() and output.video.max() <= 1.0
    samples = output.audio.shape[-1]
    assert output.audio.shape[:2] == (1, 1)
    assert abs(samples - 9 / 24 * 48000) <= 960  # num_frames / fps seconds, within one hop
    assert samples == 18000
    assert output.audio.abs().max() <= 1.0 and output.audio.std() > 0


def test_audio_length_follows_the_frame_count():
    assert audio_lengths(193, 24) == (386000, 403)  # official default
    assert audio_lengths(121, 24) == (242000, 253)  # DiffSynth's example
    assert audio_lengths(9, 24) == (18000, 19)


@pytest.mark.parametrize("bad", [{"num_frames": 6}, {"height": 40}, {"width": 24}, {"image": None},
                                 {"image": torch.rand(1, 8, 8)}, {"fps": 0}, {"boundary": 1.5}])
def test_bad_inputs_fail_before_any_work(pipe, bad, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the text encoder ran before the inputs were checked")

    monkeypatch.setattr(pipe.text_encoder, "forward", no_work)
    with pytest.raises(InputError):
        pipe("a cat", **{**CALL, **bad})


def test_expert_switch_and_cfg_run_both_towers_per_branch(pipe):
    calls = {"video_dit": 0, "video_dit_2": 0, "audio_dit": 0}
    hooks = [getattr(pipe, n).register_forward_pre_hook(lambda m, a, n=n: calls.__setitem__(n, calls[n] + 1))
             for n in calls]
    try:
        # shift 5, 4 steps: σ = 1, 0.9375, 0.833, 0.625 -> t >= 900 for the first two steps
        pipe("a cat", **{**CALL, "num_inference_steps": 4, "num_frames": 5, "guidance_scale": 3.0})
    finally:
        for h in hooks:
            h.remove()
    assert calls["video_dit"] == 4 and calls["video_dit_2"] == 4  # 2 steps × 2 CFG branches each
    # the audio tower is re-entered once per block (2 tiny blocks) inside each of its 8 calls
    assert calls["audio_dit"] == 8 * (1 + len(pipe.audio_dit.blocks))


def test_release_key_sets_on_the_meta_device():
    """Published key-set fingerprints (recipe in plugins/mova/README.md)."""
    from plugins.wan.diffusers_vae_keys import to_diffusers

    spec = core.get_registry().model("mova-720p").spec
    with torch.device("meta"):
        meta = spec.pipeline(dict(spec.presets["official"].config), device="meta", dtype=torch.bfloat16)
    expected = {"audio_dit": ("8c57e12790e2c45a64817e0ce28cde2f", 825),
                "dual_tower_bridge": ("d1139dbbc8b4ab53cf4b4243d57bbceb", 720),
                "audio_vae": ("418517fb2b4e919d2cac8f314fcf82ac", 224),
                "video_dit": ("5b013604280dd715f8457c6ed6d6a626", 1095),  # = Wan2.2-I2V-A14B
                "video_dit_2": ("5b013604280dd715f8457c6ed6d6a626", 1095),
                "text_encoder": ("9c8818c2cbea55eca56c7b447df170da", 242),  # umT5-XXL, official names
                "video_vae": ("ccc42284ea13e1ad04693284c7a09be6", 194)}  # Wan2.1 VAE, official names
    for name, (fp, count) in expected.items():
        state = getattr(meta, name).state_dict()
        assert (len(state), fingerprint(state)) == (count, fp), name
    # in the folder, the video VAE is in diffusers naming (AutoencoderKLWan's default key set)
    assert fingerprint(to_diffusers(meta.video_vae.state_dict())) == "ed4ea5824d55ec3107b09815e318123a"
    assert sum(p.numel() for p in meta.dual_tower_bridge.parameters()) == 2_659_737_600


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny pipeline with other weights (seed 1) written in the official folder layout."""
    src = core.load("mova", device="cpu", seed=1)
    root = tmp_path_factory.mktemp("mova-ckpt")
    write_checkpoint(src, root)
    return src, root


def test_checkpoint_folder_is_the_official_layout(checkpoint):
    src, root = checkpoint
    assert sorted(p.name for p in root.iterdir()) == sorted([*FOLDERS, "model_index.json"])
    for folder in ("video_dit", "video_dit_2"):
        index = json.loads((root / folder / f"{MODEL_FILE}.index.json").read_text())
        assert len(set(index["weight_map"].values())) == 2
    for folder in ("audio_dit", "dual_tower_bridge", "audio_vae", "video_vae"):
        assert (root / folder / MODEL_FILE).is_file() and (root / folder / "config.json").is_file()
    from safetensors import safe_open

    with safe_open(str(root / TEXT_ENCODER_FILE), "pt") as f:
        assert "shared.weight" in f.keys() and "encoder.block.0.layer.0.SelfAttention.q.weight" in f.keys()
    with safe_open(str(root / "video_vae" / MODEL_FILE), "pt") as f:
        assert "decoder.up_blocks.0.resnets.0.conv1.weight" in f.keys()
    assert json.loads((root / "dual_tower_bridge" / "config.json").read_text())["interaction_strategy"] == "full"


@pytest.mark.parametrize("preset", ["tiny", "official"])
def test_official_layout_loads_through_the_loader_and_generates(checkpoint, preset):
    """``official`` reads every folder's config.json, so the tiny-shaped folder loads with it too."""
    src, root = checkpoint
    loaded = core.load("mova", preset=preset, weights=root, device="cpu")
    for name, module in src.components().items():
        theirs = getattr(loaded, name).state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(theirs[key], value), f"{name}.{key}"
    call = {**CALL, "num_frames": 5, "height": 32, "width": 32, "fps": 24, "guidance_scale": 5.0,
            "boundary": 0.9}
    a, b = loaded("a red fox", **call), src("a red fox", **call)
    assert torch.equal(a.video, b.video) and torch.equal(a.audio, b.audio)


def _rewrite(path, fn):
    from safetensors.torch import load_file, save_file

    save_file(fn(load_file(str(path))), str(path))


@pytest.mark.parametrize("folder,key,how", [
    ("audio_dit", "blocks.1.ffn.2.weight", "missing"),
    ("dual_tower_bridge", "video_to_audio_conditioners.1.inner.k.weight", "shape"),
    ("audio_vae", "decoder.model.2.block.1.weight", "shape"),
    ("text_encoder", "encoder.block.1.layer.1.DenseReluDense.wo.weight", "missing"),
    ("video_vae", "decoder.conv_in.weight", "missing"),
])
def test_corrupt_checkpoint_names_file_and_key(checkpoint, tmp_path, folder, key, how):
    import shutil

    _, root = checkpoint
    shutil.copytree(root, tmp_path / "c")
    path = tmp_path / "c" / (TEXT_ENCODER_FILE if folder == "text_encoder" else f"{folder}/{MODEL_FILE}")
    if how == "missing":
        _rewrite(path, lambda sd: {k: v for k, v in sd.items() if k != key})
    else:
        _rewrite(path, lambda sd: {**sd, key: torch.zeros(*[s + 1 for s in sd[key].shape])})
    with pytest.raises(WeightsError) as err:
        core.load("mova", preset="official", weights=tmp_path / "c", device="cpu")
    message = str(err.value)
    print(message)
    assert str(path) in message, message
    # shape errors name the key as the file spells it; a missing key is named as the module expects it
    module_key = {"encoder.block.1.layer.1.DenseReluDense.wo.weight": "blocks.1.ffn.fc2.weight",
                  "decoder.conv_in.weight": "decoder.conv1.weight"}.get(key, key)
    assert (key if how == "shape" else module_key) in message, message


def test_truncated_file_is_a_weights_error(checkpoint, tmp_path):
    import shutil

    _, root = checkpoint
    shutil.copytree(root, tmp_path / "c")
    path = tmp_path / "c" / "audio_vae" / MODEL_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match="audio_vae"):
        core.load("mova", preset="official", weights=tmp_path / "c", device="cpu")


def test_default_mesh_degree_divides_every_components_heads():
    heads = {"video_dit": 40, "video_dit_2": 40, "audio_dit": 12, "dual_tower_bridge": math.gcd(40, 12)}
    assert plan_degrees(8, heads) == (4, 2)  # Ulysses 4 (divides 40 and 12), ring 2
    assert plan_degrees(16, heads, cfg_parallel=True) == (4, 2)
    assert plan_degrees(6, heads) == (2, 3)
    with pytest.raises(ParallelError) as err:
        plan_degrees(8, heads, ulysses_degree=8)
    for part in ("video_dit 40", "video_dit_2 40", "audio_dit 12", "dual_tower_bridge 4", "[1, 2, 4]"):
        assert part in str(err.value), str(err.value)


def test_output_writes_mp4_with_sound_and_wav(output, tmp_path):
    import av

    from core.outputs import write_wav

    mp4 = core.write_output(output, tmp_path / "clip.mp4")
    with av.open(str(mp4[0])) as f:
        kinds = sorted(s.type for s in f.streams)
        audio = next(s for s in f.streams if s.type == "audio")
        assert kinds == ["audio", "video"] and audio.sample_rate == 48000
    wav = write_wav(output, tmp_path / "clip.wav")
    import wave

    with wave.open(str(wav[0])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (48000, 1, 18000)


def test_bridge_adapter_leaves_its_sequences_split_only_when_declared():
    """The bridge receives and returns split streams; without ``stays_split`` the adapter would be
    refused for splits that are never gathered, and ``stays_split`` must name split sequences."""
    from pydantic import ValidationError

    from core.spec import UspAdapter

    spec = core.get_registry().model("mova").spec
    bridge = next(a for a in spec.usp if a.component == "dual_tower_bridge")
    assert bridge.gathers == [] and sorted(bridge.stays_split) == ["audio", "video"]
    assert {s.strategy for s in bridge.sites.values()} == {"gather_kv"}
    fields = bridge.model_dump()
    with pytest.raises(ValidationError, match="never gathered"):
        UspAdapter(**{**fields, "stays_split": []})
    with pytest.raises(ValidationError, match="stays_split"):
        UspAdapter(**{**fields, "stays_split": ["video", "audio", "text"]})


def test_text_encoder_key_map_covers_transformers_umt5():
    """``text_encoder/`` in transformers ``UMT5EncoderModel`` names maps one to one onto Wan's umT5."""
    from transformers import UMT5Config as HFConfig
    from transformers import UMT5EncoderModel

    from plugins.mova.plugin import umt5_key
    from plugins.wan.text_encoder import UMT5Config, UMT5Encoder

    c = UMT5Config.tiny()
    hf_config = HFConfig(vocab_size=c.vocab_size, d_model=c.dim, d_kv=c.dim_attn // c.num_heads, d_ff=c.dim_ffn,
                         num_heads=c.num_heads, num_layers=c.num_layers, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        hf = UMT5EncoderModel(hf_config).state_dict()
        ours = UMT5Encoder(c).state_dict()
    mapped = {umt5_key(k): tuple(v.shape) for k, v in hf.items() if umt5_key(k) is not None}
    assert mapped == {k: tuple(v.shape) for k, v in ours.items()}


def test_cli_writes_mp4_with_sound_and_the_wav_on_request(tmp_path):
    import av
    from PIL import Image

    from core.cli import main

    Image.new("RGB", (40, 30), (200, 90, 40)).save(tmp_path / "first.png")
    args = ["run", "mova", "--image", str(tmp_path / "first.png"), "--no-progress", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "clip.mp4"), "--wav", str(tmp_path / "clip.wav")]) == 0
    with av.open(str(tmp_path / "clip.mp4")) as container:
        assert sorted(s.type for s in container.streams) == ["audio", "video"]
    import wave

    with wave.open(str(tmp_path / "clip.wav")) as w:
        assert w.getframerate() == 48000 and w.getnframes() > 0
    # --wav on a model without audio is refused before any work
    assert main(["run", "wan", "--out", str(tmp_path / "v.mp4"), "--wav", str(tmp_path / "v.wav")]) == 2
    assert not (tmp_path / "v.mp4").exists()
