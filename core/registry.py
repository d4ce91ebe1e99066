"""Plugin discovery and the model registry.

Nothing happens at import: :func:`get_registry` builds the registry the first time a model is
looked up. Each entry point of the ``ditkit.plugins`` group is loaded on its own, and each
plugin's hooks are called on their own, so a plugin that fails to import (even with
``SystemExit``), whose hook raises or returns junk, or that claims another plugin's model name or
alias is a :class:`PluginLoadWarning` naming it and its distribution while the other plugins'
models still load (``DITKIT_STRICT_PLUGINS=1`` makes each an error).

Entry points are keyed by (distribution, name): two distributions offering the same entry-point
name are both reported. Neither shadows the other: the built-in plugins of the ``ditkit``
distribution keep their name, and between two third-party ones neither loads, unless the
allow-list picks one. ``DITKIT_PLUGINS`` (comma-separated entry-point names, or ``name@distribution``
to pick one of several) is an allow-list and ``DITKIT_DISABLE_PLUGINS`` a block-list.
"""
from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy
from pydantic import ValidationError

from . import contract, hookspecs
from .errors import PluginError, UnknownModelError
from .spec import AttentionKernelSpec, ModelSpec

ENTRY_POINT_GROUP = "ditkit.plugins"
BUILTIN_DISTRIBUTION = "ditkit"
"""The distribution of the core and the built-in plugins (``wan``): never shadowed implicitly."""


class PluginLoadWarning(UserWarning):
    """A plugin could not be loaded and was skipped (strict mode makes it a PluginError)."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin: where it came from and what it declared."""

    name: str
    distribution: str
    version: str
    hooks: tuple[str, ...]
    models: tuple[str, ...]


@dataclass(frozen=True)
class ModelRecord:
    spec: ModelSpec
    plugin: str
    distribution: str


@dataclass
class LoadFailure:
    plugin: str
    distribution: str
    error: str


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _dist_name(ep: md.EntryPoint) -> str:
    return ep.dist.metadata["Name"] if ep.dist is not None else "<unknown distribution>"


def _strict_default() -> bool:
    return os.environ.get("DITKIT_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class Registry:
    """Registered plugins and the models they declare.

    Build one with :meth:`discover` (entry points) or add plugins with :meth:`add_plugin`
    (tests, the conformance kit), then call :meth:`collect` — :func:`get_registry` does both.
    """

    strict: bool = field(default_factory=_strict_default)
    manager: pluggy.PluginManager = field(init=False)
    failures: list[LoadFailure] = field(default_factory=list)
    _dists: dict[str, tuple[str, str]] = field(default_factory=dict)
    _models: dict[str, ModelRecord] = field(default_factory=dict)
    _aliases: dict[str, str] = field(default_factory=dict)
    _kernels: dict[str, tuple[AttentionKernelSpec, str]] = field(default_factory=dict)
    _collected: bool = False

    def __post_init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)

    # -- discovery ---------------------------------------------------------------------------
    def discover(self, entry_points: Iterable[md.EntryPoint] | None = None) -> "Registry":
        allow = _env_list("DITKIT_PLUGINS")
        block = _env_list("DITKIT_DISABLE_PLUGINS") or set()
        eps = entry_points if entry_points is not None else md.entry_points(group=ENTRY_POINT_GROUP)
        by_name: dict[str, dict[str, md.EntryPoint]] = {}
        for ep in eps:
            # keyed by (distribution, name): the same distribution seen twice on sys.path is one
            # entry point, two distributions with one name are a conflict reported below
            by_name.setdefault(ep.name, {}).setdefault(_dist_name(ep), ep)
        for name in sorted(by_name):
            candidates = by_name[name]
            if name in block:
                continue
            picked = {d for d in candidates if allow is not None and f"{name}@{d}" in allow}
            if allow is not None and not picked and name not in allow:
                continue
            if picked:
                chosen = sorted(picked)[:1]
            elif len(candidates) == 1:
                chosen = list(candidates)
            else:
                dists = sorted(candidates)
                chosen = [BUILTIN_DISTRIBUTION] if BUILTIN_DISTRIBUTION in candidates else []
                skipped = [d for d in dists if d not in chosen]
                kept = f"kept the built-in one from {chosen[0]!r}" if chosen else "loaded neither"
                pick = " or ".join(f"DITKIT_PLUGINS={name}@{d}" for d in dists)
                self._fail(name, ", ".join(skipped),
                           f"clashes: distributions {', '.join(map(repr, dists))} each offer a plugin named {name!r}; "
                           f"{kept} (choose with {pick})")
            for dist in chosen:
                self._load_entry_point(candidates[dist], dist)
        return self

    def _load_entry_point(self, ep: md.EntryPoint, dist: str) -> None:
        from .interrupts import watch_sigint

        version = ep.dist.version if ep.dist is not None else "?"
        refused = contract.distribution_problem(ep.dist)  # before its import: it may need names this ditkit lacks
        if refused:
            self._fail(ep.name, dist, refused)
            return
        with watch_sigint() as sigint:
            try:
                plugin = ep.load()
            except (Exception, SystemExit, KeyboardInterrupt) as exc:  # any import-time failure, exit() included
                if sigint.is_users(exc):  # the user's Ctrl-C, not the plugin's own KeyboardInterrupt
                    raise
                self._fail(ep.name, dist, f"failed to import {ep.value!r}: {type(exc).__name__}: {exc}", exc)
                return
        self.add_plugin(plugin, name=ep.name, distribution=dist, version=version)

    def _fail(self, plugin: str, dist: str, message: str, exc: BaseException | None = None) -> None:
        text = f"ditkit plugin {plugin!r} from distribution {dist!r} {message}"
        if self.strict:
            raise PluginError(text) from exc
        self.failures.append(LoadFailure(plugin, dist, message))
        warnings.warn(text + " (skipped; set DITKIT_STRICT_PLUGINS=1 to make this an error)", PluginLoadWarning, stacklevel=3)

    def add_plugin(self, plugin: Any, *, name: str, distribution: str = "<local>", version: str = "?") -> None:
        """Register a plugin object (module or instance with ``@hookimpl`` functions)."""
        try:
            self.manager.register(plugin, name=name)
            # a hookimpl whose name is not in hookspecs (typo) fails here, naming the plugin
            self.manager.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if self.manager.is_registered(plugin):
                self.manager.unregister(plugin)
            self._fail(name, distribution, f"is invalid: {exc}", exc)
            return
        self._dists[name] = (distribution, version)
        self._collected = False

    # -- collection --------------------------------------------------------------------------
    def collect(self) -> "Registry":
        """Call every plugin's hooks and validate what they return. A plugin whose hook fails is
        reported (warning, or :class:`PluginError` in strict mode) and contributes nothing."""
        self._models.clear()
        self._aliases.clear()
        self._kernels.clear()
        self.failures = [f for f in self.failures if not f.error.startswith("hook ")]
        for impl in self._ordered(self.manager.hook.ditkit_register_models.get_hookimpls()):
            dist = self._dists.get(impl.plugin_name, ("<local>", "?"))[0]
            for spec in self._call(impl, dist, ModelSpec):
                self._add_model(spec, impl.plugin_name, dist)
        for impl in self._ordered(self.manager.hook.ditkit_register_attention_kernels.get_hookimpls()):
            dist = self._dists.get(impl.plugin_name, ("<local>", "?"))[0]
            for k in self._call(impl, dist, AttentionKernelSpec):
                if k.name in self._kernels:
                    other = self._kernels[k.name][1]
                    self._fail(impl.plugin_name, dist, f"hook ditkit_register_attention_kernels: attention kernel "
                               f"{k.name!r} is already registered by distribution {other!r}; skipped")
                    continue
                self._kernels[k.name] = (k, dist)
        self._collected = True
        return self

    def _ordered(self, impls: list) -> list:
        """Built-in plugins first, then by name: who keeps a contested name never depends on
        ``sys.path`` order, and a third-party plugin never takes a built-in model's name."""
        def key(impl):
            dist = self._dists.get(impl.plugin_name, ("<local>", "?"))[0]
            return (dist != BUILTIN_DISTRIBUTION, impl.plugin_name)

        return sorted(impls, key=key)

    def _call(self, impl: pluggy.HookImpl, dist: str, record_type: type) -> list:
        hook = impl.function.__name__
        try:
            returned = impl.function()
        except (Exception, SystemExit) as exc:
            self._fail(impl.plugin_name, dist, f"hook {hook} raised {type(exc).__name__}: {exc}", exc)
            return []
        if returned is None:
            return []
        if isinstance(returned, (record_type, dict, str, bytes)) or not isinstance(returned, Iterable):
            self._fail(impl.plugin_name, dist, f"hook {hook} must return a list of {record_type.__name__}, "
                       f"got {type(returned).__name__}")
            return []
        records = []
        try:
            for i, item in enumerate(returned):
                records.append(item if isinstance(item, record_type) else record_type.model_validate(item))
        except ValidationError as exc:
            self._fail(impl.plugin_name, dist, f"hook {hook} returned an invalid {record_type.__name__} "
                       f"(item {i}): {' '.join(str(exc).split())}", exc)
            return []
        except Exception as exc:  # noqa: BLE001 - a generator hook that raises midway
            self._fail(impl.plugin_name, dist, f"hook {hook} raised {type(exc).__name__} while its result was read: {exc}", exc)
            return []
        return records

    def _add_model(self, spec: ModelSpec, plugin: str, dist: str) -> None:
        refused = contract.spec_problem(spec)
        if refused:
            self._fail(plugin, dist, f"hook ditkit_register_models: {refused}")
            return
        for claimed in (spec.name, *spec.aliases):
            owner = self._models.get(claimed) or self._models.get(self._aliases.get(claimed, ""))
            if owner is not None:
                self._fail(plugin, dist, f"hook ditkit_register_models: model name {claimed!r} is already claimed by "
                           f"plugin {owner.plugin!r} (distribution {owner.distribution!r}); model {spec.name!r} skipped")
                return
        record = ModelRecord(spec, plugin, dist)
        self._models[spec.name] = record
        for alias in spec.aliases:
            self._aliases[alias] = spec.name

    # -- queries -----------------------------------------------------------------------------
    def _ensure(self) -> None:
        if not self._collected:
            self.collect()

    def model(self, name: str) -> ModelRecord:
        self._ensure()
        key = name.strip().lower()
        key = self._aliases.get(key, key)
        if key in self._models:
            return self._models[key]
        known = sorted([*self._models, *self._aliases])
        close = difflib.get_close_matches(key, known, n=5, cutoff=0.5)
        if close:
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?"
        else:
            hint = f"; registered models: {', '.join(sorted(self._models)) or 'none'}"
        failed = ""
        if self.failures:
            # the model may belong to a plugin that failed: say which and why
            parts = [f"plugin {f.plugin!r} ({f.distribution}) failed to load: {f.error}" for f in self.failures]
            failed = "; it may belong to a plugin that failed: " + "; ".join(parts)
        raise UnknownModelError(f"unknown model {name!r}{hint}{failed}")

    def models(self) -> list[ModelRecord]:
        self._ensure()
        return [self._models[n] for n in sorted(self._models)]

    def kernels(self) -> list[AttentionKernelSpec]:
        self._ensure()
        return [k for k, _ in self._kernels.values()]

    def plugins(self) -> list[PluginInfo]:
        self._ensure()
        infos = []
        for name, plugin in sorted(self.manager.list_name_plugin()):
            dist, version = self._dists.get(name, ("<local>", "?"))
            hooks = tuple(sorted(h.name for h in self.manager.get_hookcallers(plugin) or ()))
            models = tuple(r.spec.name for r in self._models.values() if r.plugin == name)
            infos.append(PluginInfo(name, dist, version, hooks, models))
        return infos


_registry: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, built from entry points on first use."""
    global _registry
    if _registry is None or refresh:
        registry = Registry().discover().collect()
        from . import attention

        for k in registry.kernels():
            attention.register_kernel(k.name, k.kernel)
        _registry = registry
    return _registry


def list_models() -> list[str]:
    """Names of every registered model (aliases not included)."""
    return [r.spec.name for r in get_registry().models()]
