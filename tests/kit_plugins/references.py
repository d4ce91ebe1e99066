"""The example plugin with references that cannot run or cannot be found, for ``reference-parity``'s
skip and failure paths, and one that differs from the plugin by a known amount, for its tolerances
(the example has no independent implementation; the diffusers-Flux example and Qwen-Image carry the
real references)."""
from core import hookimpl

from ._base import example_spec


def needs_a_missing_package(pipe, call, noise):
    import ditkit_no_such_package  # noqa: F401  (a reference's test-time dependency, not installed)


OUTPUT_OFFSET = 1e-3
"""How far :func:`output_off_by_a_little` moves the output: a relative error of 1e-3 / (1 + 1e-3) in
the kit's metric, between the default output tolerance (1e-4) and the loosened one below (1e-2)."""


def output_off_by_a_little(pipe, call, noise):
    """Not an independent implementation: the plugin's own output, moved by :data:`OUTPUT_OFFSET`
    of its spread, so only the tolerance decides whether the ladder matches."""
    out = pipe(**call, progress=False).tensor()
    return {"output": out + OUTPUT_OFFSET * (out - out.mean())}


def _spec(name: str, reference, **conformance_fields):
    base = example_spec()
    conformance = base.conformance.model_copy(update={"reference": reference, **conformance_fields})
    return base.model_copy(update={"name": name, "aliases": [], "conformance": conformance})


@hookimpl
def ditkit_register_models():
    return [
        _spec("ref-missing-package", needs_a_missing_package),
        _spec("ref-missing-package-at-import", "tests.kit_plugins._reference_needing_a_package:reference"),
        _spec("ref-missing-module", "tests.kit_plugins.no_such_reference_module:reference"),
        _spec("ref-missing-attribute", "tests.kit_plugins.references:no_such_reference"),
        _spec("ref-output-off", output_off_by_a_little),
        _spec("ref-output-off-loosened", output_off_by_a_little, reference_tolerances={"output": 1e-2}),
    ]
