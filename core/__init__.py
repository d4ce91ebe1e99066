"""ditkit core: plugin registry, pipeline base, compilation, sequence parallelism.

``import core`` loads no plugin; the registry is built on first use::

    import core
    pipe = core.load("example-dit")       # tiny preset: random weights, CPU, seconds
    pipe.compile_pipeline()
    out = pipe("a red fox", seed=0)
"""
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
from .contract import CONTRACT_VERSION
from .hookspecs import hookimpl
from .loading import load
from .outputs import Output, write_output
from .pipeline import Pipeline
from .registry import get_registry, list_models

__all__ = [
    "CONTRACT_VERSION", "load", "list_models", "get_registry", "hookimpl", "Pipeline", "Output", "write_output",
    "DitkitError", "PluginError", "UnknownModelError", "WeightsError", "InputError", "CompileError", "ParallelError", "RankFailed",
    "OutputError", "GenerationError", "Interrupted",
]
__version__ = "0.2.0"
"""The ditkit release; :data:`CONTRACT_VERSION` is the plugin contract it implements (docs/contract.md)."""
