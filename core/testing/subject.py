"""The model under test: its record, and cached pipelines built from it."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from ..registry import ModelRecord, Registry, get_registry
from ..spec import ModelSpec


@dataclass
class Subject:
    """A registered model as the conformance kit sees it.

    ``plugin`` (``"module"`` or ``"module:attr"``) registers a plugin that is not installed through
    an entry point (a plugin under development, or the kit's own deliberately wrong plugins); worker
    processes of the USP check import it the same way.
    """

    name: str
    plugin: str | None = None
    record: ModelRecord = field(init=False)
    _pipes: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.plugin:
            registry = Registry(strict=True)
            registry.add_plugin(import_plugin(self.plugin), name=self.plugin, distribution="<local>")
            self.record = registry.model(self.name)
        else:
            self.record = get_registry().model(self.name)

    @property
    def spec(self) -> ModelSpec:
        return self.record.spec

    def build(self, **options):
        from ..errors import InputError
        from ..loading import load_spec

        if options.get("weight_dtype") is not None:
            # the kit's checks prove exactness (compiled = eager, parallel = one process, the
            # reference); fp8 weight storage gives it up by design, so it is never certified
            raise InputError(f"the conformance kit does not check lossy pipelines: weight_dtype="
                             f"{options['weight_dtype']!r} stores weights in fp8 (build without it)")
        options.setdefault("device", "cpu")
        options.setdefault("dtype", torch.float32)
        return load_spec(self.spec, "tiny", **options)

    def pipe(self, key: str = "eager"):
        """A cached tiny pipeline (one per key, so compiled and eager copies stay apart)."""
        if key not in self._pipes:
            self._pipes[key] = self.build()
        return self._pipes[key]

    def known_arguments(self) -> set[str]:
        """Generation arguments the pipeline takes: the base call's, the class defaults' and every
        preset's defaults' keys (what ``Pipeline.check_inputs`` accepts)."""
        from ..pipeline import Pipeline

        cls = self.spec.pipeline if isinstance(self.spec.pipeline, type) else type(self.pipe())
        presets = {k for p in self.spec.presets.values() for k in p.defaults}
        return {*Pipeline.base_arguments, *getattr(cls, "defaults", {}), *presets}

    def call_args(self, **overrides) -> dict:
        return {"seed": 0, "progress": False, **self.spec.conformance.call, **overrides}


def import_plugin(ref: str):
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj
