"""Loading the official Wan checkpoint layout (docs/models.md, Wan checkpoint layout) through ``core.load``.

The tests write a checkpoint directory at tiny shapes from a tiny pipeline built with other
random weights (seed 1): the DiT as sharded safetensors with its index json (in
``high_noise_model/`` and ``low_noise_model/`` for the A14B experts), the VAE and the umT5
encoder as torch pickles (umT5 in bf16, as published) and the tokenizer folder
``google/umt5-xxl``.  ``core.load(name, preset="tiny", weights=dir)`` must then hold exactly those
weights and generate exactly the source pipeline's video.
"""
from __future__ import annotations

import json

import pytest
import torch

import core
import core.registry
import plugins.wan.plugin as wan_plugin
from plugins.wan.text_encoder import T5_CHECKPOINT


@pytest.fixture(autouse=True)
def wan_only(monkeypatch):
    reg = core.registry.Registry(strict=True)
    reg.add_plugin(wan_plugin, name="wan", distribution="ditkit")
    monkeypatch.setattr(core.registry, "_registry", reg.collect())


def write_checkpoint(pipe, root) -> None:
    """The plugin's checkpoint writer with the published umT5 dtype (bf16)."""
    wan_plugin.write_checkpoint(pipe, root, shards=3, t5_dtype=torch.bfloat16)


def source(name: str):
    """A tiny pipeline whose weights differ from the preset's (seed 1) and whose umT5 weights are
    bf16-representable, so the bf16 ``.pth`` round trip is exact."""
    pipe = core.load(name, device="cpu", seed=1)
    with torch.no_grad():
        for p in pipe.text_encoder.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return pipe


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"])
def test_official_layout_loads_exactly(name, tmp_path):
    src = source(name)
    write_checkpoint(src, tmp_path)
    loaded = core.load(name, preset="tiny", weights=tmp_path, device="cpu")
    fresh = core.load(name, device="cpu")  # the preset's own random weights (seed 0)
    for component, module in src.components().items():
        theirs = loaded.components()[component].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(theirs[key], value), f"{component}.{key}"
    assert not torch.equal(fresh.dit.blocks[0].ffn[0].weight, loaded.dit.blocks[0].ffn[0].weight)
    args = dict(seed=0, num_inference_steps=2)
    if "i2v" in name:
        args["image"] = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded("a red fox", **args).video, src("a red fox", **args).video)


def test_layout_on_disk(tmp_path):
    write_checkpoint(source("wan2.2-t2v-a14b"), tmp_path)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "google" not in p.parts)
    shards = [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = "diffusion_pytorch_model.safetensors.index.json"
    assert files == sorted(["Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
                            *(f"{e}_noise_model/{f}" for e in ("high", "low") for f in (*shards, index))])
    weight_map = json.loads((tmp_path / "high_noise_model" / index).read_text())["weight_map"]
    assert set(weight_map.values()) == set(shards) and "head.head.weight" in weight_map
    assert (tmp_path / "google" / "umt5-xxl" / "tokenizer.json").is_file()
    t5 = torch.load(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    assert {v.dtype for v in t5.values()} == {torch.bfloat16}


def test_missing_umt5_key_is_a_weights_error_naming_it(tmp_path):
    name = "wan2.1-t2v-1.3b"
    write_checkpoint(source(name), tmp_path)
    sd = torch.load(tmp_path / T5_CHECKPOINT, weights_only=True)
    del sd["blocks.1.ffn.fc2.weight"]
    torch.save(sd, tmp_path / T5_CHECKPOINT)
    with pytest.raises(core.WeightsError, match=r"blocks\.1\.ffn\.fc2\.weight"):
        core.load(name, preset="tiny", weights=tmp_path, device="cpu")


def test_missing_tokenizer_folder_and_expert_are_weights_errors(tmp_path):
    name = "wan2.2-t2v-a14b"
    write_checkpoint(source(name), tmp_path)
    (tmp_path / "low_noise_model" / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(core.WeightsError, match="low_noise_model"):
        core.load(name, preset="tiny", weights=tmp_path, device="cpu")
    import shutil

    shutil.rmtree(tmp_path / "google")
    with pytest.raises(core.WeightsError, match="umt5-xxl"):
        core.load(name, preset="tiny", weights=tmp_path, device="cpu")


def test_repack_prefix_is_stripped(tmp_path):
    """Third-party repacks (ComfyUI) prefix the DiT keys with ``model.diffusion_model.``."""
    name = "wan2.1-t2v-1.3b"
    src = source(name)
    write_checkpoint(src, tmp_path)
    for p in tmp_path.glob("diffusion_pytorch_model*"):
        p.unlink()
    wan_plugin.save_sharded_safetensors({f"model.diffusion_model.{k}": v for k, v in src.dit.state_dict().items()}, tmp_path, 2)
    loaded = core.load(name, preset="tiny", weights=tmp_path, device="cpu")
    assert torch.equal(loaded.dit.head.head.weight, src.dit.head.head.weight)
