"""A plugin's acceleration declarations checked against its model, before any work.

``repeated_blocks`` and ``compiled_methods`` name classes and methods, and a
:class:`~core.spec.UspAdapter` names the submodules where sequences are split and gathered. Those
names can only be checked against a built model; :func:`check_declarations` does it on the
pipeline built on the meta device (no memory, no weights), so ``ditkit run`` reports a wrong name
before any rank starts, as a :class:`~core.errors.PluginError` naming the plugin and its
distribution (:func:`declared_by`), rather than from inside ``compile_pipeline`` or on one rank.
"""
from __future__ import annotations

from torch import nn

from .errors import CompileError, ParallelError, PluginError, UnknownModelError

__all__ = ["check_declarations", "declared_by"]


def declared_by(pipe) -> str:
    """``plugin 'p' (distribution 'd'), model 'm'``: who declared ``pipe``'s spec."""
    spec = pipe.spec
    plugin = getattr(pipe, "plugin_name", None)
    distribution = None
    try:
        from .registry import get_registry

        record = get_registry().model(spec.name)
        if plugin is None or record.plugin == plugin:
            plugin, distribution = record.plugin, record.distribution
    except (UnknownModelError, PluginError):
        pass
    return (f"plugin {plugin or type(pipe).__module__.split('.')[0]!r} (distribution {distribution or '<local>'!r}), "
            f"model {spec.name!r}")


def _compile_problems(pipe) -> list[str]:
    from .compile import _block_classes, repeated_block_names

    spec, components, problems = pipe.spec, pipe.components(), []
    for name in spec.compilable_models:
        module = components.get(name)
        if not isinstance(module, nn.Module):
            problems.append(f"compilable component {name!r} is not an nn.Module attribute of {type(pipe).__name__}")
            continue
        blocks = repeated_block_names(module, spec.repeated_blocks.get(name, ()))
        for cls_name in blocks:
            try:
                _block_classes(name, module, cls_name)
            except CompileError as exc:
                problems.append(str(exc))
        if not blocks:
            for method in spec.compiled_methods.get(name, ["forward"]):
                if not callable(getattr(module, method, None)):
                    problems.append(f"compiled_methods of {name!r} ({type(module).__name__}) names {method!r}, "
                                    f"which it does not have")
    return problems


def _usp_problems(pipe) -> list[str]:
    from .parallel.hooks import resolve_module

    problems = []
    for adapter in pipe.spec.usp:
        component = getattr(pipe, adapter.component, None)
        if not isinstance(component, nn.Module):
            problems.append(f"USP adapter names component {adapter.component!r}, which the {type(pipe).__name__} "
                            f"pipeline does not have (components: {sorted(pipe.components())})")
            continue
        for rule in (*adapter.splits, *adapter.gathers):
            try:
                resolve_module(component, rule.module, adapter.component)
            except ParallelError as exc:
                problems.append(str(exc))
    return problems


def check_declarations(pipe, *, compile: bool = True, usp: bool = True) -> None:
    """Every name ``pipe``'s spec declares for compilation (``compile``) and sequence parallelism
    (``usp``) exists in ``pipe`` (built on the meta device is enough); otherwise one
    :class:`PluginError` naming the plugin, its distribution, the model and each wrong name."""
    problems = (_compile_problems(pipe) if compile else []) + (_usp_problems(pipe) if usp else [])
    if problems:
        raise PluginError(f"{declared_by(pipe)} declares what its model does not have: {'; '.join(problems)}")
