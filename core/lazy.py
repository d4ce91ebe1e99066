"""Declarations that name their code instead of importing it.

A plugin module is imported whenever the registry is built (``ditkit plugins``, ``--help``, every
run), so whatever it imports at top level every command pays for. ``ModelSpec(pipeline=
"my_pkg.pipeline:MyPipeline")`` names the pipeline class as ``"module:attr"``; the spec holds an
:class:`ImportRef`, which imports it the first time a model is built (or its signature read).
"""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

__all__ = ["ImportRef"]

_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ImportRef:
    """A callable standing for ``module:attr``, imported on first use (then cached).

    Calling it calls the target; ``inspect.signature`` sees the target's signature;
    :meth:`resolve` returns the target itself."""

    __slots__ = ("ref", "_target")

    def __init__(self, ref: str):
        if not isinstance(ref, str) or not _REF.match(ref):
            raise ValueError(f"an import reference is 'package.module:attribute', got {ref!r}")
        self.ref = ref
        self._target = None

    def resolve(self) -> Any:
        """The object ``ref`` names (importing its module the first time)."""
        if self._target is None:
            module, _, attr = self.ref.partition(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self._target = obj
        return self._target

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    @property
    def __signature__(self):
        # None (the target cannot be imported) lets the caller go on and meet the import error
        # where it is reported with the plugin's name (core.loading)
        try:
            return inspect.signature(self.resolve())
        except (ImportError, AttributeError, TypeError, ValueError):
            return None

    def __eq__(self, other) -> bool:
        return isinstance(other, ImportRef) and other.ref == self.ref

    def __hash__(self) -> int:
        return hash(("ImportRef", self.ref))

    def __repr__(self) -> str:
        return f"ImportRef({self.ref!r})"
