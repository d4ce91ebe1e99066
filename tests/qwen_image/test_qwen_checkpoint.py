"""Qwen-Image checkpoint layout: the official preset's key sets (meta device), the tiny
official-layout directory written by the plugin's writer, loading it through ``core.load``, and
corruption of each component's file."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import core
from core.errors import WeightsError
from plugins.qwen_image.pipeline import QwenImagePipeline
from plugins.qwen_image.plugin import LAYOUT, TEXT_ENCODER_FILE, VAE_FILE, model_spec, write_checkpoint
from plugins.qwen_image.text_encoder import text_model_key
from plugins.wan.diffusers_vae_keys import to_diffusers
from tests.fingerprints import fingerprint

PROMPT = "a lighthouse on a cliff at dusk"


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_official_preset_key_sets_on_meta():
    """The official preset, built from its config on the meta device, has the published key sets:
    transformer 1933 tensors, text encoder 729 (in the on-disk older layout), VAE 194."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = model_spec().presets["official"].config
    with torch.device("meta"):
        pipe = QwenImagePipeline(config, device="meta", dtype=torch.bfloat16)
        full = Qwen2_5_VLForConditionalGeneration(pipe.text_config)
    assert fingerprint(_shapes(pipe.transformer)) == "0319a1cb19835fb510907dd3367c95ff"
    assert fingerprint(to_diffusers(_shapes(pipe.vae))) == "ed4ea5824d55ec3107b09815e318123a"
    on_disk = {}
    for key, shape in _shapes(full).items():  # current transformers names -> the published older names
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        on_disk[key] = shape
    assert len(on_disk) == 729
    assert fingerprint(on_disk) == "8004730443f55db63092006dd9f7110e"
    # the key map reads exactly the language model from those 729 and skips the rest
    mapped = {text_model_key(k): s for k, s in on_disk.items() if text_model_key(k) is not None}
    assert mapped == _shapes(pipe.text_encoder)
    assert sum(v.numel() for v in pipe.text_encoder.state_dict().values()) == 7_070_619_136


@pytest.fixture(scope="module")
def source():
    return core.load("qwen-image", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-official-layout")
    write_checkpoint(source, root)
    return root


def test_written_layout(written):
    names = sorted(str(p.relative_to(written)) for p in written.rglob("*") if p.is_file())
    for expected in ("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                     "transformer/diffusion_pytorch_model.safetensors.index.json",
                     "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                     "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
                     "text_encoder/model-00002-of-00002.safetensors", "vae/config.json", VAE_FILE,
                     "tokenizer/tokenizer.json"):
        assert expected in names, (expected, names)
    te = json.loads((written / "text_encoder/model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("visual.") for k in te) and "lm_head.weight" in te
    assert "model.layers.0.self_attn.q_proj.weight" in te and not any("language_model" in k for k in te)
    assert json.loads((written / "vae/config.json").read_text())["latents_std"][0] == 2.8184


def test_loads_through_core_load_and_generates(source, written):
    loaded = core.load("qwen-image", preset="tiny", weights=written, device="cpu", dtype=torch.float32)
    for comp in ("transformer", "text_encoder", "vae"):
        ref, got = getattr(source, comp).state_dict(), getattr(loaded, comp).state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), comp
    a = source(PROMPT, num_inference_steps=2, progress=False).tensor()
    b = loaded(PROMPT, num_inference_steps=2, progress=False).tensor()
    assert torch.equal(a, b)


def _edit_safetensors(path, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    save_file(fn(sd), str(path))


@pytest.mark.parametrize("target,edit,named", [
    (TEXT_ENCODER_FILE, "drop", "model.embed_tokens.weight"),
    (VAE_FILE, "reshape", "decoder.conv_in.weight"),
    ("transformer/diffusion_pytorch_model.safetensors", "drop", "img_in.bias"),
])
def test_corruption_names_file_and_key(written, tmp_path, target, edit, named):
    """A key missing from a shard (and from its index) or a wrong shape: WeightsError naming the
    key as the checkpoint spells it and the component's folder."""
    root = tmp_path / "ckpt"
    shutil.copytree(written, root)
    path = root / target
    index = path.with_name(path.name + ".index.json")
    if index.is_file():  # sharded: edit the shard that holds the key, and the index with it
        weight_map = json.loads(index.read_text())
        path = path.parent / weight_map["weight_map"].pop(named)
        index.write_text(json.dumps(weight_map))

    def change(sd):
        assert named in sd, sorted(sd)[:5]
        if edit == "drop":
            del sd[named]
        else:
            sd[named] = torch.zeros(*[s + 1 for s in sd[named].shape])
        return sd

    _edit_safetensors(path, change)
    with pytest.raises(WeightsError) as exc:
        core.load("qwen-image", preset="tiny", weights=root, device="cpu")
    message = str(exc.value)
    # core's loader names a missing key by the module's name (``embed_tokens.weight`` for the text
    # encoder's ``model.embed_tokens.weight``), a wrong shape by the checkpoint's
    assert (named if edit == "reshape" else text_model_key(named)) in message
    assert f"{path.parent.name}/" in message


def test_missing_tokenizer_and_configs(written, tmp_path):
    for rel in ("tokenizer", "model_index.json", "vae/config.json"):
        root = tmp_path / rel.replace("/", "_")
        shutil.copytree(written, root)
        target = root / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(WeightsError, match=rel.split("/")[-1]):
            core.load("qwen-image", preset="tiny", weights=root, device="cpu")


def test_layout_declares_key_maps():
    maps = {wf.component: wf.key_map for wf in LAYOUT.files}
    assert maps == {"transformer": None, "text_encoder": "plugins.qwen_image.text_encoder:text_model_key",
                    "vae": "plugins.wan.diffusers_vae_keys:official_key"}
    assert TEXT_ENCODER_FILE == "text_encoder/model.safetensors"
