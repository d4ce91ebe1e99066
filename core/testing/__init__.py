"""The conformance kit: prove a plugin correct under compilation and sequence parallelism.

Two ways to run it:

- ``ditkit check NAME [--usp 2] [--json] [-k PATTERN]``: no test code; a table of checks with
  pass / fail / skip (and the reason), non-zero exit on a failure.
- In a plugin's own test suite, subclass :class:`PluginConformance` and supply the model name::

      from core.testing import PluginConformance

      class TestMyModel(PluginConformance):
          model_name = "my-model"
          expected_failures = {"usp-parity": "ring attention not supported yet"}

Each check has a readable id (``spec-valid``, ``weights-load``, ``compile-parity``, ``usp-parity``,
...) for ``pytest -k`` and ``ditkit check -k``; see :data:`CHECKS`.
"""
from .base import PluginConformance
from .checks import CHECK_IDS, CHECKS, CheckFailed, CheckSkipped, KitOptions
from .runner import CheckResult, UnknownExpectedFailure, format_table, run_checks
from .subject import Subject

__all__ = [
    "PluginConformance", "CHECKS", "CHECK_IDS", "CheckFailed", "CheckSkipped", "KitOptions", "CheckResult",
    "UnknownExpectedFailure", "format_table", "run_checks", "Subject",
]
