"""The plugin contract's version, the requirements plugins state on it, and the 1.0 names it still accepts.

The contract is what a plugin relies on: the hooks (:mod:`core.hookspecs`), the records they return
(:mod:`core.spec`), the :class:`core.Pipeline` methods and generation arguments, and what the
conformance kit expects. ``docs/contract.md`` lists every part with the version it appeared in.

Versions are ``MAJOR.MINOR``. A minor version only adds (an optional field, a hook, a method, a call
argument) or deprecates: a deprecated name keeps working through the whole major version with one
:class:`ContractDeprecationWarning` naming its replacement. Only a major version removes or changes
what a plugin relies on.

A plugin may state what it needs, and an incompatible plugin is refused by the registry with one
message naming the plugin, its requirement and the running version:

- ``ModelSpec(contract=">=1.1,<2")``: a PEP 440 specifier set on :data:`CONTRACT_VERSION`;
- its distribution's requirement on ``ditkit`` (``Requires-Dist: ditkit>=0.2``), checked against the
  running ditkit version before the plugin module is imported (pip checks it at install time, but not
  with ``--no-deps``, a source checkout on ``PYTHONPATH`` or an upgrade of ditkit alone).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Mapping

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name

from .errors import InputError

__all__ = [
    "CONTRACT_VERSION", "RELEASES", "RENAMED_ARGUMENTS", "ADDED_ARGUMENTS", "ContractDeprecationWarning",
    "parse_requirement", "spec_problem", "distribution_problem",
]

DITKIT_VERSION = "0.2.0"
"""This ditkit release (``core.__version__``; pyproject.toml says the same, a test checks it)."""

CONTRACT_VERSION = "1.1"
"""The plugin contract this ditkit implements (``core.CONTRACT_VERSION``)."""

RELEASES = {"0.1.0": "1.0", "0.2.0": "1.1"}
"""ditkit release -> the contract version it implements."""

RENAMED_ARGUMENTS: dict[str, tuple[str, str]] = {"steps": ("num_inference_steps", "1.1")}
"""Deprecated generation argument -> (its new name, the contract version that renamed it). The old
name keeps working within the major version, for callers and plugins alike."""

ADDED_ARGUMENTS: dict[str, str] = {"generator": "1.1"}
"""Generation arguments the core passes to ``generate()`` that a plugin written before the version
named here does not take; the core leaves them out for such a plugin (see :func:`generate_arguments`)."""

_PACKAGE = "ditkit"


class ContractDeprecationWarning(DeprecationWarning):
    """A name of an older plugin contract was used; it still works within this major version.
    The message names the new name and who wrote the old one (the caller or the plugin)."""


# -- requirements ----------------------------------------------------------------------------------
def parse_requirement(text: str) -> SpecifierSet:
    """A ``ModelSpec.contract`` string as a specifier set (``ValueError`` naming the string otherwise)."""
    try:
        spec = SpecifierSet(text)
    except InvalidSpecifier:
        raise ValueError(f"contract {text!r} is not a version specifier; write e.g. '>=1.1,<2'") from None
    if not str(spec):
        raise ValueError("contract is empty; write a version specifier such as '>=1.1,<2', or leave it unset")
    return spec


def spec_problem(spec) -> str | None:
    """Why the running contract cannot serve ``spec`` (a :class:`core.spec.ModelSpec`), or ``None``."""
    if spec.contract is None or parse_requirement(spec.contract).contains(CONTRACT_VERSION, prereleases=True):
        return None
    return (f"model {spec.name!r} requires plugin contract {spec.contract} (ModelSpec.contract), but the running "
            f"ditkit {_running_version()} implements contract {CONTRACT_VERSION}; refused")


def distribution_problem(dist) -> str | None:
    """Why the running ditkit does not satisfy ``dist``'s own requirement on ``ditkit`` (its
    ``Requires-Dist`` metadata), or ``None``. Requirements of extras and of other platforms are
    not the plugin's needs here and are skipped."""
    if dist is None:
        return None
    running = _running_version()
    for line in dist.requires or ():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != _PACKAGE:
            continue
        if req.marker is not None and not req.marker.evaluate({**default_environment(), "extra": ""}):
            continue
        if req.specifier and not req.specifier.contains(running, prereleases=True):
            return (f"requires ditkit{req.specifier} (Requires-Dist of its distribution), but the running ditkit "
                    f"{running} implements plugin contract {CONTRACT_VERSION}; refused")
    return None


def _running_version() -> str:
    return DITKIT_VERSION


# -- deprecated and added generation arguments -----------------------------------------------------
def _deprecated(old: str, who: str) -> str:
    new, version = RENAMED_ARGUMENTS[old]
    return (f"{who} the generation argument {old!r}, renamed {new!r} in plugin contract {version}: use {new!r} "
            f"({old!r} keeps working until contract {int(version.split('.')[0]) + 1}.0)")


def renamed(args: Mapping[str, Any], who: str) -> dict[str, Any]:
    """``args`` with every deprecated name replaced by its new one (values kept). Both names set
    (not ``None``) is an :class:`InputError` naming ``who`` wrote them."""
    out = dict(args)
    for old, (new, version) in RENAMED_ARGUMENTS.items():
        if old not in out:
            continue
        value = out.pop(old)
        if value is not None and out.get(new) is not None:
            raise InputError(f"{who} gives both {old!r} and {new!r}, which are one argument ({old!r} is its "
                             f"name before plugin contract {version}); pass only {new!r}")
        if value is not None or new not in out:
            out[new] = value
    return out


def declared_name(pipe, name: str) -> str | None:
    """The name under which ``pipe`` declares the generation argument ``name`` (a current name):
    ``name`` itself, its contract-1.0 name where the pipeline's defaults still use that, or ``None``
    when the pipeline does not take it."""
    declared = {*type(pipe).base_arguments, *getattr(type(pipe), "defaults", {}), *getattr(pipe, "preset_defaults", {})}
    if name in declared:
        return name
    return next((old for old, (new, _) in RENAMED_ARGUMENTS.items() if new == name and old in declared), None)


def caller_arguments(pipe, kwargs: Mapping[str, Any], stacklevel: int) -> dict[str, Any]:
    """A caller's generation arguments with deprecated names renamed. The caller is warned unless the
    pipeline itself still declares the old name (then the caller uses the plugin's own name, and the
    plugin is warned instead: :func:`plugin_defaults`)."""
    for old in RENAMED_ARGUMENTS:
        if dict.get(kwargs, old) is not None and declared_name(pipe, RENAMED_ARGUMENTS[old][0]) != old:
            warnings.warn(_deprecated(old, "the call passes"), ContractDeprecationWarning, stacklevel=stacklevel + 1)
    return renamed(kwargs, "the call")


def plugin_defaults(pipe) -> dict[str, Any]:
    """The pipeline's class defaults overridden by its preset's, in current names. The first time a
    pipeline is resolved, one :class:`ContractDeprecationWarning` per deprecated name lists every place
    the plugin still writes it: ``defaults``, a preset's defaults, ``conformance.call`` /
    ``uneven_call`` / ``bad_inputs`` and ``generate()``'s parameters."""
    cls = type(pipe)
    who = f"plugin {pipe._plugin_name()!r} ({cls.__name__})"
    defaults = renamed(getattr(cls, "defaults", {}), f"{who} defaults")
    defaults.update(renamed(getattr(pipe, "preset_defaults", {}), f"{who} preset defaults"))
    if not pipe.__dict__.get("_contract_warned"):
        pipe.__dict__["_contract_warned"] = True
        for old, places in _plugin_uses(pipe).items():
            warnings.warn(_deprecated(old, f"{who} still writes (in {', '.join(places)})"),
                          ContractDeprecationWarning, stacklevel=4)
    return defaults


def _plugin_uses(pipe) -> dict[str, list[str]]:
    """Deprecated argument name -> the places of the plugin that still write it."""
    cls, spec = type(pipe), getattr(pipe, "spec", None)
    sources: list[tuple[str, Mapping]] = [("defaults", getattr(cls, "defaults", {}))]
    if spec is not None:
        sources += [(f"presets[{name!r}].defaults", p.defaults) for name, p in spec.presets.items()]
        c = spec.conformance
        sources += [("conformance.call", c.call), ("conformance.uneven_call", c.uneven_call or {})]
        sources += [(f"conformance.bad_inputs[{i}]", bad) for i, bad in enumerate(c.bad_inputs)]
    else:
        sources.append(("preset defaults", getattr(pipe, "preset_defaults", {})))
    params = _parameters(pipe.generate)
    uses: dict[str, list[str]] = {}
    for old in RENAMED_ARGUMENTS:
        places = [where for where, mapping in sources if old in mapping]
        if params is not None and old in params:
            places.append("generate()")
        if places:
            uses[old] = places
    return uses


def _parameters(fn) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a C callable: it judges its own arguments
        return None


def generate_arguments(pipe, args: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved ``args`` as ``pipe.generate()`` accepts them: a renamed argument under the name
    its signature takes (the old one for a plugin written to contract 1.0), and an argument added
    since the plugin's contract left out when it is unset. A caller who really passes one
    (a ``generator``) to a ``generate()`` that cannot take it gets an :class:`InputError` naming the
    plugin, not a ``TypeError`` from inside it."""
    params = _parameters(pipe.generate)
    out = dict(args)
    if params is None:
        return out
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for old, (new, _) in RENAMED_ARGUMENTS.items():
        if new in out and new not in params and (old in params or (var_kw and declared_name(pipe, new) == old)):
            out[old] = out.pop(new)
    if not var_kw:
        for name, version in ADDED_ARGUMENTS.items():
            if name in out and name not in params:
                if out[name] is not None:
                    raise InputError(
                        f"plugin {pipe._plugin_name()!r}: {type(pipe).__name__}.generate() takes no {name!r} (it was "
                        f"written before plugin contract {version}, which added it); this model is seeded with "
                        f"seed= only")
                del out[name]
    return out


class Arguments(dict):
    """Resolved generation arguments, in current names. A plugin's own code written to contract 1.0
    still reads them under the old name (``args["steps"]``, ``args.get("steps")`` in its
    ``check_inputs`` or ``estimate_bytes``); it was warned once already (:func:`plugin_defaults`)."""

    def __missing__(self, key):
        new = RENAMED_ARGUMENTS.get(key, (None,))[0]
        if new is not None and new in self:
            return self[new]
        raise KeyError(key)

    def get(self, key, default=None):
        if key not in self and key in RENAMED_ARGUMENTS:
            return dict.get(self, RENAMED_ARGUMENTS[key][0], default)
        return dict.get(self, key, default)


def known_arguments(pipe) -> set[str]:
    """Every generation argument ``pipe`` takes, in current names: the base call's and the keys of
    its class and preset defaults."""
    cls = type(pipe)
    return {*cls.base_arguments, *renamed(getattr(cls, "defaults", {}), "defaults"),
            *renamed(getattr(pipe, "preset_defaults", {}), "preset defaults")}


def legacy_attribute(pipe, name: str, replacement: str):
    """A contract-1.0 class attribute of a pipeline built without ``core.load`` (no spec attached):
    ``compilable_models`` and ``size_multiple`` were read from the class then. Returns the subclass's
    value, with a :class:`ContractDeprecationWarning` naming ``replacement``, or ``None``."""
    value = getattr(type(pipe), name, None)
    if value is None:
        return None
    warnings.warn(f"{type(pipe).__name__}.{name} (a Pipeline class attribute of plugin contract 1.0) is read only "
                  f"for a pipeline built without core.load; declare {replacement} and build with core.load "
                  f"(deprecated in contract 1.1, removed in 2.0)", ContractDeprecationWarning, stacklevel=4)
    return value
