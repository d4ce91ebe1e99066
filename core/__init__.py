"""ditkit core: plugin registry, pipeline base, compilation, sequence parallelism.

``import core`` loads no plugin; the registry is built on first use::

    import core
    pipe = core.load("example-dit")       # tiny preset: random weights, CPU seconds
    pipe.compile_pipeline()
    out = pipe("a red fox", seed=0)

Importing ``core`` (as every plugin module does for ``core.hookimpl``) reads the declarations only:
the error types and the hook markers. ``load``, ``Pipeline``, ``Output`` and the rest, and every
submodule (``core.loading``, ``core.registry``, ...), are imported on first access, so ``ditkit
plugins`` and ``ditkit --help`` never pay for the pipeline code (CONTRIBUTING.md, "Imports").
"""
from importlib import import_module

from .errors import (
    CompileError,
    DitkitError,
    GenerationError,
    InputError,
    Interrupted,
    OutputError,
    ParallelError,
    PluginError,
    RankFailed,
    UnknownModelError,
    WeightsError,
)
from .contract import CONTRACT_VERSION, DITKIT_VERSION
from .hookspecs import hookimpl

_LAZY = {
    "load": "loading", "list_models": "registry", "get_registry": "registry", "Pipeline": "pipeline",
    "Output": "outputs", "write_output": "outputs",
}
"""Public names imported on first access: attribute -> the submodule that defines it."""

__all__ = [
    "CONTRACT_VERSION", "load", "list_models", "get_registry", "hookimpl", "Pipeline", "Output", "write_output",
    "DitkitError", "PluginError", "UnknownModelError", "WeightsError", "InputError", "CompileError", "ParallelError", "RankFailed",
    "OutputError", "GenerationError", "Interrupted",
]
__version__ = DITKIT_VERSION
"""The ditkit release; :data:`CONTRACT_VERSION` is the plugin contract it implements (docs/contract.md)."""


def __getattr__(name: str):
    """``core.load``, ``core.Pipeline``, ... and submodules (``core.registry``), imported when first used."""
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("__"):
        try:
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
