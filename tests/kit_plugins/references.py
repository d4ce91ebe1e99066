"""The example plugin with references that cannot run or cannot be found, for ``reference-parity``'s
skip and failure paths (the example has no independent implementation; the diffusers-Flux example
and Qwen-Image carry the real references)."""
from core import hookimpl

from ._base import example_spec


def needs_a_missing_package(pipe, call, noise):
    import ditkit_no_such_package  # noqa: F401  (a reference's test-time dependency, not installed)


def _spec(name: str, reference):
    base = example_spec()
    conformance = base.conformance.model_copy(update={"reference": reference})
    return base.model_copy(update={"name": name, "aliases": [], "conformance": conformance})


@hookimpl
def ditkit_register_models():
    return [
        _spec("ref-missing-package", needs_a_missing_package),
        _spec("ref-missing-package-at-import", "tests.kit_plugins._reference_needing_a_package:reference"),
        _spec("ref-missing-module", "tests.kit_plugins.no_such_reference_module:reference"),
        _spec("ref-missing-attribute", "tests.kit_plugins.references:no_such_reference"),
    ]
