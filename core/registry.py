"""Plugin discovery and the model registry.

Nothing happens at import: :func:`get_registry` builds the registry the first time a model is
looked up. Each entry point of the ``ditkit.plugins`` group is loaded on its own, so one broken
plugin is a warning naming its distribution while the others still load
(``DITKIT_STRICT_PLUGINS=1`` makes it an error). ``DITKIT_PLUGINS`` (comma-separated entry-point
names) is an allow-list and ``DITKIT_DISABLE_PLUGINS`` a block-list.
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

from . import hookspecs
from .errors import PluginError, UnknownModelError
from .spec import AttentionKernelSpec, ModelSpec

ENTRY_POINT_GROUP = "ditkit.plugins"


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
        seen: set[str] = set()
        for ep in sorted(eps, key=lambda e: e.name):
            if ep.name in seen:
                continue  # the same distribution visible twice on sys.path
            seen.add(ep.name)
            if (allow is not None and ep.name not in allow) or ep.name in block:
                continue
            dist = ep.dist.metadata["Name"] if ep.dist is not None else "<unknown distribution>"
            version = ep.dist.version if ep.dist is not None else "?"
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time failure of a third-party plugin
                self._fail(ep.name, dist, f"failed to import {ep.value!r}: {type(exc).__name__}: {exc}", exc)
                continue
            self.add_plugin(plugin, name=ep.name, distribution=dist, version=version)
        return self

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
        """Call every plugin's hooks and validate what they return."""
        self._models.clear()
        self._aliases.clear()
        self._kernels.clear()
        for impl in self.manager.hook.ditkit_register_models.get_hookimpls():
            dist = self._dists.get(impl.plugin_name, ("<local>", "?"))[0]
            for spec in self._call(impl, dist, ModelSpec):
                self._add_model(spec, impl.plugin_name, dist)
        for impl in self.manager.hook.ditkit_register_attention_kernels.get_hookimpls():
            dist = self._dists.get(impl.plugin_name, ("<local>", "?"))[0]
            for k in self._call(impl, dist, AttentionKernelSpec):
                if k.name in self._kernels:
                    other = self._kernels[k.name][1]
                    raise PluginError(f"attention kernel {k.name!r} is registered by both {other!r} and {dist!r}")
                self._kernels[k.name] = (k, dist)
        self._collected = True
        return self

    def _call(self, impl: pluggy.HookImpl, dist: str, record_type: type) -> list:
        where = f"plugin {impl.plugin_name!r} (distribution {dist!r}), hook {impl.function.__name__}"
        try:
            returned = impl.function()
        except Exception as exc:
            raise PluginError(f"{where} raised {type(exc).__name__}: {exc}") from exc
        if returned is None:
            return []
        if isinstance(returned, (record_type, dict)) or not isinstance(returned, Iterable):
            raise PluginError(f"{where} must return a list of {record_type.__name__}, got {type(returned).__name__}")
        records = []
        for item in returned:
            try:
                records.append(item if isinstance(item, record_type) else record_type.model_validate(item))
            except ValidationError as exc:
                raise PluginError(f"{where} returned an invalid {record_type.__name__}:\n{exc}") from exc
        return records

    def _add_model(self, spec: ModelSpec, plugin: str, dist: str) -> None:
        for claimed in (spec.name, *spec.aliases):
            owner = self._models.get(claimed) or self._models.get(self._aliases.get(claimed, ""))
            if owner is not None:
                raise PluginError(
                    f"model name {claimed!r} is claimed by two plugins: {owner.plugin!r} (distribution "
                    f"{owner.distribution!r}) and {plugin!r} (distribution {dist!r})"
                )
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
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(sorted(self._models)) or "none (no plugin registered a model)"
        raise UnknownModelError(f"unknown model {name!r}{hint} Registered models: {listing}")

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
