"""Loading the example plugin from official-layout checkpoints written here at tiny shapes."""
import json

import pytest
import torch
from safetensors.torch import save_file

from core.errors import WeightsError


def _state(pipe, component):
    return {k: v.detach().clone().contiguous() for k, v in getattr(pipe, component).state_dict().items()}


def write_checkpoint(root, pipe, *, shard_dit=False):
    dit = _state(pipe, "dit")
    (root / "transformer").mkdir(parents=True)
    if shard_dit:
        keys = sorted(dit)
        halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for fname, names in halves.items():
            save_file({k: dit[k] for k in names}, str(root / "transformer" / fname))
        index = {"metadata": {}, "weight_map": {k: f for f, names in halves.items() for k in names}}
        (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(dit, str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    for comp, folder, fname in (("vae", "vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "text_encoder", "model.safetensors")):
        (root / folder).mkdir()
        save_file(_state(pipe, comp), str(root / folder / fname))
    return root


@pytest.fixture
def source(example):
    return example.load("example-dit", seed=123)


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_checkpoint_loads_through_the_real_loader(example, source, tmp_path, shard):
    root = write_checkpoint(tmp_path / "ckpt", source, shard_dit=shard)
    loaded = example.load("example-dit", weights=root)
    for comp in ("dit", "vae", "text_encoder"):
        for key, value in getattr(source, comp).state_dict().items():
            assert torch.equal(getattr(loaded, comp).state_dict()[key], value), (comp, key)
    a = source("a cat", num_inference_steps=2, seed=1, progress=False).images
    b = loaded("a cat", num_inference_steps=2, seed=1, progress=False).images
    assert torch.equal(a, b)


def test_loading_casts_to_the_requested_dtype(example, source, tmp_path):
    from .test_weight_reader import _CountCasts

    root = write_checkpoint(tmp_path / "ckpt", source)
    with _CountCasts() as casts:
        loaded = example.load("example-dit", weights=root, dtype="bfloat16")
    # each float32 file tensor cast once into bf16, and nothing else in memory: the factory's own
    # .to(bfloat16) ran on deferred parameters (meta), not on a float32 model built first
    file_elements = sum(v.numel() for c in ("dit", "vae", "text_encoder") for v in _state(source, c).values())
    assert casts.elements - casts.on_meta == file_elements, (casts.elements, casts.on_meta, file_elements)
    assert loaded.dit.patch_embed.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.dit.patch_embed.weight, source.dit.patch_embed.weight.to(torch.bfloat16))


def test_missing_file_names_the_file(example, source, tmp_path):
    root = write_checkpoint(tmp_path / "ckpt", source)
    (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"vae/diffusion_pytorch_model\.safetensors"):
        example.load("example-dit", weights=root)


def test_missing_and_unexpected_keys_are_named(example, source, tmp_path):
    root = write_checkpoint(tmp_path / "ckpt", source)
    path = root / "text_encoder" / "model.safetensors"
    state = _state(source, "text_encoder")
    state.pop("norm.weight")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(path))
    with pytest.raises(WeightsError) as info:
        example.load("example-dit", weights=root)
    message = str(info.value)
    assert "norm.weight" in message and "extra.weight" in message and "model.safetensors" in message


def test_wrong_shape_names_key_and_both_shapes(example, source, tmp_path):
    root = write_checkpoint(tmp_path / "ckpt", source)
    path = root / "vae" / "diffusion_pytorch_model.safetensors"
    state = _state(source, "vae")
    state["conv_out.weight"] = torch.zeros(3, 8, 3, 3)
    save_file(state, str(path))
    with pytest.raises(WeightsError) as info:
        example.load("example-dit", weights=root)
    assert "conv_out.weight" in str(info.value) and "[3, 8, 3, 3]" in str(info.value) and "[3, 16, 3, 3]" in str(info.value)


def test_truncated_file_is_an_error_naming_it(example, source, tmp_path):
    root = write_checkpoint(tmp_path / "ckpt", source)
    path = root / "transformer" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors"):
        example.load("example-dit", weights=root)


def test_missing_shard_is_named(example, source, tmp_path):
    root = write_checkpoint(tmp_path / "ckpt", source, shard_dit=True)
    (root / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="00002-of-00002"):
        example.load("example-dit", weights=root)


def test_preset_that_needs_weights_says_so(example):
    with pytest.raises(WeightsError, match="weights="):
        example.load("example-dit", preset="base")


def test_weights_directory_must_exist(example, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        example.load("example-dit", weights=tmp_path / "nope")


def test_pth_checkpoints_load_memory_mapped(tmp_path):
    from core.spec import WeightFile
    from core.weights import load_component

    module = torch.nn.Linear(3, 2)
    torch.save({"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, tmp_path / "m.pth")
    assert load_component(tmp_path, WeightFile(component="m", path="m.pth", format="torch"), module)
    assert torch.equal(module.weight, torch.ones(2, 3))
    torch.save({"weight": torch.ones(2, 4), "bias": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"\[2, 4\].*\[2, 3\]"):
        load_component(tmp_path, WeightFile(component="m", path="bad.pth", format="torch"), module)
