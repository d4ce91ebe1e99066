"""The loading path: bytes read once and cast once, straight into the module's own tensors (any
device: the meta device stands for CUDA here), threaded or not, tied parameters under either name."""
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from core.errors import WeightsError
from core.spec import WeightFile
from core.weight_reader import LoadStats, TensorSource, fill
from core.weights import check_layout, deferred_parameters, load_component, materialize_parameters


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(48, 40)
        self.b = nn.Linear(40, 8, bias=False)
        self.register_buffer("scale", torch.ones(3))


def _source_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(40, 48, generator=g), "a.bias": torch.randn(40, generator=g),
            "b.weight": torch.randn(8, 40, generator=g), "scale": torch.randn(3, generator=g)}


class _CountCasts(TorchDispatchMode):
    """Counts every element converted from one dtype to another, whatever the Python call."""

    def __init__(self):
        super().__init__()
        self.elements = 0
        self.on_meta = 0
        """Of which on the meta device (shapes only, no memory)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = 0
        if func is torch.ops.aten.copy_.default and args[0].dtype != args[1].dtype:
            n = args[1].numel()
        elif func is torch.ops.aten._to_copy.default and kwargs.get("dtype", args[0].dtype) != args[0].dtype:
            n = args[0].numel()
        self.elements += n
        self.on_meta += n if args and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta" else 0
        return func(*args, **kwargs)


@pytest.fixture
def counted_reads(monkeypatch):
    """Total bytes the loader reads from files (every read goes through os.preadv), and where in
    memory each read went (address, length)."""
    import numpy as np

    total = {"bytes": 0, "into": []}
    real = os.preadv

    def preadv(fd, buffers, offset):
        n = real(fd, buffers, offset)
        total["bytes"] += n
        total["into"].extend((np.frombuffer(b, dtype=np.uint8).ctypes.data, len(b)) for b in buffers)
        return n

    monkeypatch.setattr(os, "preadv", preadv)
    return total


@pytest.mark.parametrize("file_dtype,module_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                     (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("threads", [1, 3])
def test_each_byte_read_once_and_each_tensor_cast_once(tmp_path, counted_reads, file_dtype, module_dtype, threads):
    state = {k: v.to(file_dtype) for k, v in _source_state().items()}
    save_file(state, str(tmp_path / "m.safetensors"))
    module = _Model().to(module_dtype)
    wf = WeightFile(component="m", path="m.safetensors")
    stats = LoadStats()
    with _CountCasts() as casts:
        assert load_component(tmp_path, wf, module, stats=stats, threads=threads)
    file_bytes = sum(v.numel() * v.element_size() for v in state.values())
    assert counted_reads["bytes"] == file_bytes == stats.bytes_read
    if file_dtype == module_dtype:  # no cast: the file's bytes go straight into the module's own tensors
        own = [(t.data_ptr(), t.numel() * t.element_size()) for t in module.state_dict().values()]
        assert all(any(a <= at and at + n <= a + size for a, size in own) for at, n in counted_reads["into"])
    expected_casts = 0 if file_dtype == module_dtype else sum(v.numel() for v in state.values())
    assert casts.elements == expected_casts, (casts.elements, expected_casts)
    for key, value in module.state_dict().items():
        assert value.dtype == module_dtype
        assert torch.equal(value, state[key].to(module_dtype)), key


def test_pieces_larger_than_the_staging_buffer_and_threads_give_the_same_tensors(tmp_path):
    state = _source_state(1)
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    wf = WeightFile(component="m", path="m.safetensors")
    ckpt, mapping = check_layout(tmp_path, wf, _Model())
    results = []
    for threads, staging in ((1, 1 << 20), (4, 64)):  # 64 bytes: every tensor read and cast in many pieces
        module = _Model()
        targets = module.state_dict(keep_vars=True)
        stats = fill([(targets[mk], ckpt.sources[ck]) for mk, ck in mapping.items()], threads=threads,
                     staging_bytes=staging)
        assert stats.staged_bytes == stats.bytes_read and stats.cast == len(state)
        results.append(module.state_dict())
    for key in state:
        assert torch.equal(results[0][key], results[1][key]) and torch.equal(results[0][key], state[key].to(torch.bfloat16).float())


def test_a_device_target_goes_through_a_bounded_staging_buffer_without_a_host_copy(tmp_path, monkeypatch):
    """The meta device stands for CUDA: the module is built there, so nothing the size of the model
    may be allocated on the host; every byte must still be read, through the staging buffers."""
    import core.weight_reader as reader

    g = torch.Generator().manual_seed(0)
    big = {"a.weight": torch.randn(40, 48, generator=g), "a.bias": torch.randn(40, generator=g),
           "b.weight": torch.randn(8, 40, generator=g), "scale": torch.randn(3, generator=g)}
    save_file({k: v.to(torch.bfloat16) for k, v in big.items()}, str(tmp_path / "m.safetensors"))
    # as core.load builds: parameters deferred while the factory runs (its .to() decides their device
    # and dtype; buffers stay real), then allocated on the target device, here meta for CUDA
    with deferred_parameters():
        module = _Model().to(device="meta", dtype=torch.float16)
    allocated = []
    real_empty = torch.empty

    def empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        if t.device.type == "cpu":
            allocated.append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(reader.torch, "empty", empty)  # from here on: materialized, then filled
    with _CountCasts() as casts:
        materialize_parameters({"m": module})
    assert module.a.weight.device.type == "meta" and module.a.weight.dtype == torch.float16
    assert casts.elements == 0 and not allocated  # once, on the target device, in the final dtype
    stats = LoadStats()
    load_component(tmp_path, WeightFile(component="m", path="m.safetensors"), module, stats=stats, threads=1)
    file_bytes = sum(v.numel() * 2 for v in big.values())
    assert stats.bytes_read == stats.staged_bytes == file_bytes
    assert allocated and max(allocated) == reader.STAGING_BYTES  # the two staging buffers, nothing else
    assert len(allocated) == 2


def test_pth_archives_are_read_by_byte_range_without_loading_them(tmp_path, counted_reads, monkeypatch):
    state = _source_state(2)
    state["b.weight"] = state["b.weight"].to(torch.bfloat16)
    torch.save(state, tmp_path / "m.pth")
    real_load = torch.load

    def load(*args, **kwargs):  # the archive may be opened only on the meta device (its index)
        assert kwargs.get("map_location") == "meta", kwargs
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    module = _Model()
    assert load_component(tmp_path, WeightFile(component="m", path="m.pth", format="torch"), module)
    assert counted_reads["bytes"] == sum(v.numel() * v.element_size() for v in state.values())
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key].float()), key


def test_a_file_truncated_after_its_header_was_read_is_a_weights_error(tmp_path):
    save_file(_source_state(), str(tmp_path / "m.safetensors"))
    wf = WeightFile(component="m", path="m.safetensors")
    module = _Model()
    checked = check_layout(tmp_path, wf, module)
    path = tmp_path / "m.safetensors"
    os.truncate(path, path.stat().st_size - 64)
    with pytest.raises(WeightsError, match=r"m\.safetensors"):
        load_component(tmp_path, wf, module, checked=checked)


def test_source_and_target_shapes_must_agree(tmp_path):
    save_file({"x": torch.ones(4)}, str(tmp_path / "x.safetensors"))
    src = TensorSource(tmp_path / "x.safetensors", 8 + 64, torch.float32, (4,))
    with pytest.raises(ValueError, match=r"\[4\].*\[5\]"):
        fill([(torch.empty(5), src)])


# -- tied parameters (transformers' T5 / umT5 encoders, written by save_pretrained) -------------------
def _tiny_encoder(kind: str):
    import transformers

    cfg_cls, model_cls = {"t5": (transformers.T5Config, transformers.T5EncoderModel),
                          "umt5": (transformers.UMT5Config, transformers.UMT5EncoderModel)}[kind]
    cfg = cfg_cls(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    return model_cls(cfg).eval()


@pytest.mark.parametrize("kind", ["t5", "umt5"])
@pytest.mark.parametrize("name_in_file", ["as saved", "the other name"])
def test_tied_parameters_load_from_a_file_holding_either_name(tmp_path, counted_reads, kind, name_in_file):
    from safetensors import safe_open

    source = _tiny_encoder(kind)
    source.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    tied = set(source.state_dict()) - set(saved)
    assert tied == {"encoder.embed_tokens.weight"}  # what save_pretrained leaves out
    if name_in_file == "the other name":
        saved["encoder.embed_tokens.weight"] = saved.pop("shared.weight")
        save_file(saved, str(path))
    with torch.device("meta"):
        meta = type(source)(source.config)
    assert check_layout(tmp_path, WeightFile(component="text_encoder", path="model.safetensors"), meta)
    target = type(source)(source.config).eval()
    torch.nn.init.zeros_(target.shared.weight)
    assert load_component(tmp_path, WeightFile(component="text_encoder", path="model.safetensors"), target)
    assert target.shared.weight is target.encoder.embed_tokens.weight
    assert counted_reads["bytes"] == sum(v.numel() * v.element_size() for v in saved.values())  # the tie read once
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    ids = torch.tensor([[3, 5, 7, 1]])
    assert torch.equal(target(input_ids=ids).last_hidden_state, source(input_ids=ids).last_hidden_state)


def test_an_untied_missing_key_is_still_missing(tmp_path):
    source = _tiny_encoder("t5")
    state = {k: v for k, v in source.state_dict().items() if k not in ("encoder.embed_tokens.weight", "shared.weight")}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing keys \(2\)"):
        check_layout(tmp_path, WeightFile(component="text_encoder", path="model.safetensors"), source)


def test_deferred_parameters_take_no_memory_until_materialized_in_their_final_dtype():
    """A factory that builds in float32 and casts to bf16 allocates neither: parameters stay on the
    meta device until materialized; buffers computed in __init__ keep their values; ties hold."""
    import transformers

    with deferred_parameters():
        model = _Model().to(torch.bfloat16)
        model.register_buffer("table", torch.arange(4, dtype=torch.float64))
        t5 = _tiny_encoder("t5").to(torch.bfloat16)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.scale.device.type == "cpu" and model.scale.dtype == torch.bfloat16 and torch.equal(model.scale, torch.ones(3, dtype=torch.bfloat16))
    assert torch.equal(model.table, torch.arange(4, dtype=torch.float64))
    materialize_parameters({"model": model, "t5": t5})
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in [*model.parameters(), *t5.parameters()])
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    assert isinstance(t5, transformers.T5EncoderModel) and nn.Linear(2, 2).weight.device.type == "cpu"  # context undone


class _ComputesFromWeights(nn.Module):
    """A module whose __init__ derives a buffer from its parameter's values (deferred parameters
    have none): core.load must notice and build this factory's parameters for real."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("total", self.lin.weight.detach().sum().reshape(1), persistent=False)


def test_a_factory_that_computes_with_its_parameters_still_loads(tmp_path):
    from core.loading import load_spec
    from core.pipeline import Pipeline
    from core.spec import ModelSpec, Preset, WeightsLayout

    class _Pipe(Pipeline):
        def __init__(self, config, *, device, dtype, weights=None):
            super().__init__(device=device, dtype=dtype)
            self.net = _ComputesFromWeights().to(device=device, dtype=dtype)

    state = {"lin.weight": torch.randn(4, 4), "lin.bias": torch.randn(4)}
    save_file(state, str(tmp_path / "net.safetensors"))
    spec = ModelSpec(name="computes", pipeline=_Pipe, presets={"tiny": Preset(random_weights=True)},
                     weights=WeightsLayout(files=[WeightFile(component="net", path="net.safetensors")]))
    pipe = load_spec(spec, weights=tmp_path, device="cpu")
    assert pipe.net.total.device.type == "cpu"
    assert torch.equal(pipe.net.lin.weight, state["lin.weight"]) and torch.equal(pipe.net.lin.bias, state["lin.bias"])
