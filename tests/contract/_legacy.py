"""Pipelines whose ``generate()`` is the whole model (seeded noise through a sigmoid), to test how the
core hands them their arguments: one written to contract 1.1, one to 1.0 (``steps``, no
``generator``), one taking ``**kwargs``. Registered as a plugin module for the kit
(``Subject(name, plugin="tests.contract._legacy")``)."""
from __future__ import annotations

import torch

from core import Output, Pipeline, hookimpl
from core.spec import Capabilities, Conformance, ModelSpec, Preset, SizeRange


class CurrentPipeline(Pipeline):
    defaults = {"num_inference_steps": 3, "guidance_scale": 1.0, "height": 16, "width": 16}

    def __init__(self, config=None, *, device="cpu", dtype=torch.float32, weights=None):
        super().__init__(device=device, dtype=dtype)
        self.received: list[dict] = []
        self.net = torch.nn.Linear(3, 3)

    def generate(self, *, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator, height,
                 width, progress=None):
        self.received.append({"num_inference_steps": num_inference_steps, "generator": generator})
        x = self.noise((1, 3, height, width), seed, generator=generator)
        return Output(kind="image", images=torch.sigmoid(x * num_inference_steps))


class Contract10Pipeline(Pipeline):
    """As plugins were written against contract 1.0."""

    compilable_models = ("net",)
    size_multiple = 8
    defaults = {"steps": 3, "guidance_scale": 1.0, "height": 16, "width": 16}

    def __init__(self, config=None, *, device="cpu", dtype=torch.float32, weights=None):
        super().__init__(device=device, dtype=dtype)
        self.received: list[dict] = []
        self.net = torch.nn.Linear(3, 3)

    def check_inputs(self, args):
        super().check_inputs(args)
        if args["steps"] > 8 or args.get("steps") > 8:  # a 1.0 plugin's own rule, reading its own name
            raise core_input_error(f"steps must be at most 8, got {args['steps']}")

    def generate(self, *, prompt, negative_prompt, steps, guidance_scale, seed, height, width, progress=None):
        self.received.append({"steps": steps})
        x = self.noise((1, 3, height, width), seed)
        return Output(kind="image", images=torch.sigmoid(x * steps))


class KwargsPipeline(Contract10Pipeline):
    """A 1.0 plugin whose ``generate`` takes ``**args`` and reads its own name."""

    def generate(self, **args):
        self.received.append(dict(args))
        x = self.noise((1, 3, args["height"], args["width"]), args["seed"])
        return Output(kind="image", images=torch.sigmoid(x * args["steps"]))


def core_input_error(message):
    from core import InputError

    return InputError(message)


def _spec(name, pipeline, **conformance):
    return ModelSpec(name=name, pipeline=pipeline, presets={"tiny": Preset(random_weights=True)},
                     compilable_models=["net"], capabilities=Capabilities(cfg=False, size_multiple=8),
                     conformance=Conformance(sizes={"height": SizeRange(min=8, max=16, multiple=8),
                                                    "width": SizeRange(min=8, max=16, multiple=8)}, **conformance))


@hookimpl
def ditkit_register_models():
    return [
        _spec("current", CurrentPipeline),
        _spec("contract10", Contract10Pipeline, call={"steps": 2}),
        _spec("contract10-default-call", Contract10Pipeline),  # the kit's default call (current names)
    ]
