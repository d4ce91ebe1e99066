"""The model under test: its record, and cached pipelines built from it."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from ..contract import RENAMED_ARGUMENTS
from ..errors import PluginError
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
    deprecations: list[str] = field(default_factory=list, init=False)
    """Each contract deprecation the plugin's use raised during the checks, once (reported with the results)."""
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
        return load_spec(self.spec, "tiny", _plugin=self.record.plugin, **options)

    def pipe(self, key: str = "eager"):
        """A cached tiny pipeline (one per key, so compiled and eager copies stay apart)."""
        if key not in self._pipes:
            self._pipes[key] = self.build()
        return self._pipes[key]

    def declared_arguments(self) -> set[str]:
        """Generation arguments as the pipeline declares them: the base call's, the class defaults'
        and every preset's defaults' keys, in the plugin's own names."""
        from ..lazy import ImportRef
        from ..pipeline import Pipeline

        factory = self.spec.pipeline.resolve() if isinstance(self.spec.pipeline, ImportRef) else self.spec.pipeline
        cls = factory if isinstance(factory, type) else type(self.pipe())
        presets = {k for p in self.spec.presets.values() for k in p.defaults}
        return {*getattr(cls, "base_arguments", Pipeline.base_arguments), *getattr(cls, "defaults", {}), *presets}

    def known_arguments(self) -> set[str]:
        """Every name ``Pipeline.check_inputs`` accepts: the declared arguments and, for each renamed
        one, its other name (``steps`` / ``num_inference_steps``)."""
        declared = self.declared_arguments()
        aliases = {other for old, (new, _) in RENAMED_ARGUMENTS.items() if {old, new} & declared for other in (old, new)}
        return declared | aliases

    def argument(self, name: str) -> str | None:
        """The name under which the pipeline takes the generation argument the kit calls ``name``
        (a current name such as ``num_inference_steps``): ``name``, the contract-1.0 name the
        pipeline still declares, or ``None`` when the pipeline does not take it. The kit's calls go
        through this, so they use the plugin's own names and never insert one it does not declare."""
        declared = self.declared_arguments()
        if name in declared:
            return name
        return next((old for old, (new, _) in RENAMED_ARGUMENTS.items() if new == name and old in declared), None)

    def call_args(self, **overrides) -> dict:
        """The conformance call with ``overrides`` on top, every key under the pipeline's own name
        (a key the pipeline does not take stays as written: the pipeline must refuse it)."""
        call = {"seed": 0, "progress": False}
        for key, value in [*self.spec.conformance.call.items(), *overrides.items()]:
            current = RENAMED_ARGUMENTS.get(key, (key,))[0]
            call[self.argument(current) or key] = value
        return call


def import_plugin(ref: str):
    """The plugin object ``ref`` names (``"module"`` or ``"module:attr"``); a module that does not
    import, or lacks the attribute, is a :class:`PluginError` naming it."""
    from ..interrupts import watch_sigint

    module, _, attr = ref.partition(":")
    with watch_sigint() as sigint:
        try:
            obj = importlib.import_module(module)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # a plugin's own import-time failure included
            if sigint.is_users(exc):
                raise
            hint = " (is it installed, or on PYTHONPATH?)" if isinstance(exc, ModuleNotFoundError) else ""
            raise PluginError(f"cannot import plugin module {module!r}: {type(exc).__name__}: {exc}{hint}") from exc
    if attr and not hasattr(obj, attr):
        raise PluginError(f"plugin module {module!r} has no attribute {attr!r}")
    return getattr(obj, attr) if attr else obj
