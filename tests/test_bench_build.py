"""``ditkit bench`` builds random weights on the device and in the benchmarked dtype: a real-size
preset (Qwen-Image's 27 B parameters, Wan 14B's 20 B with umT5) never exists on the CPU, nor in
float32 on the way to bf16, which would not fit an 80 GB card."""
import types

import torch

import core


def test_bench_builds_random_weights_on_the_device_in_the_benchmarked_dtype():
    from core.bench import _build

    seen = {}

    class Recorder(core.Pipeline):
        def __init__(self, config, *, device, dtype, weights=None):
            super().__init__(device="cpu", dtype=dtype)
            seen.update(default_dtype=torch.get_default_dtype(), device=torch.empty(1).device,
                        linear=torch.nn.Linear(2, 2).weight.dtype)

    preset = types.SimpleNamespace(config={}, defaults={})
    spec = types.SimpleNamespace(presets={"p": preset}, pipeline=Recorder, name="recorder")
    before = torch.get_default_dtype()
    _build(spec, "p", torch.device("meta"), torch.bfloat16)
    assert seen == {"default_dtype": torch.bfloat16, "device": torch.device("meta"), "linear": torch.bfloat16}
    assert torch.get_default_dtype() == before
