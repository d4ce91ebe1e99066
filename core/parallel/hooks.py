"""Splitting and gathering token sequences where they enter or leave a component's submodules.

A :class:`core.spec.SequenceSplit` becomes a forward (pre-)hook that replaces one tensor with
this rank's padded shard; a :class:`core.spec.SequenceGather` one that replaces a shard with the
whole, unpadded sequence.  ``arg`` picks the tensor: at an input, a keyword name (found also when
passed positionally), a positional index, or ``None`` for the first positional argument; at an
output, a tuple index, a mapping key / attribute name, or ``None`` for the whole output.  A
``None`` tensor (an optional input the call left out) is passed through untouched, and so is a
tensor whose ``dim`` has size 1: it broadcasts over the tokens (Wan's timestep features are
``(B, L, ...)`` per token for TI2V-5B but ``(B, 1, ...)`` for 2.1; one adapter serves both).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from core.errors import ParallelError
from core.spec import SequenceGather, SequenceSplit

from .mesh import Mesh
from .shards import SequenceState, gather_tensor, shard_tensor

__all__ = ["install_sequence_hooks", "resolve_module"]


def resolve_module(component: nn.Module, path: str, component_name: str) -> nn.Module:
    """The submodule at dotted ``path`` (``""``: the component), or a :class:`ParallelError` naming it."""
    if not path:
        return component
    try:
        return component.get_submodule(path)
    except AttributeError:
        raise ParallelError(f"USP adapter of {component_name!r} names submodule {path!r}, which does not exist") from None


def _positional_index(module: nn.Module, name: str) -> int | None:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.name == name and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return i
    return None


def _map_input(module, args, kwargs, arg, fn: Callable[[torch.Tensor], torch.Tensor], where):
    args = list(args)
    if isinstance(arg, str) and arg in kwargs:
        if kwargs[arg] is not None:
            kwargs[arg] = fn(kwargs[arg])
        return tuple(args), kwargs
    index = arg if isinstance(arg, int) else 0 if arg is None else _positional_index(module, arg)
    if index is None or index >= len(args):
        if isinstance(arg, str):  # an optional keyword the call left out
            return tuple(args), kwargs
        raise ParallelError(f"{where}: the call has {len(args)} positional argument(s), none at index {index}")
    if args[index] is not None:
        args[index] = fn(args[index])
    return tuple(args), kwargs


def _map_output(output, arg, fn: Callable[[torch.Tensor], torch.Tensor], where):
    if arg is None:
        return fn(output)
    if isinstance(output, tuple) and isinstance(arg, int):
        items = list(output)
        if items[arg] is not None:
            items[arg] = fn(items[arg])
        return type(output)(*items) if hasattr(output, "_fields") else tuple(items)
    if isinstance(output, list) and isinstance(arg, int):
        output = list(output)
        if output[arg] is not None:
            output[arg] = fn(output[arg])
        return output
    if isinstance(arg, str) and hasattr(output, "__getitem__") and not isinstance(output, torch.Tensor):
        try:
            value = output[arg]
        except (KeyError, TypeError, IndexError):
            value = getattr(output, arg, None)
            if value is None:
                raise ParallelError(f"{where}: the output has no entry {arg!r}") from None
            setattr(output, arg, fn(value))
            return output
        if value is not None:
            output[arg] = fn(value)
        return output
    if isinstance(arg, str) and hasattr(output, arg):
        setattr(output, arg, fn(getattr(output, arg)))
        return output
    raise ParallelError(f"{where}: cannot select {arg!r} from an output of type {type(output).__name__}")


def _check_tensor(t: Any, dim: int, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ParallelError(f"{where}: expected a tensor, got {type(t).__name__}")
    if not -t.dim() <= dim < t.dim():
        raise ParallelError(f"{where}: dim {dim} is out of range for a tensor of shape {tuple(t.shape)}")
    return t


def _where(component_name: str, rule: SequenceSplit | SequenceGather, verb: str) -> str:
    module = rule.module or "<component>"
    return f"{component_name}: {verb} of sequence {rule.sequence!r} at {module}.{rule.at}[{rule.arg!r}]"


def install_sequence_hooks(
    component: nn.Module,
    component_name: str,
    splits: list[SequenceSplit],
    gathers: list[SequenceGather],
    mesh: Mesh,
    state: SequenceState,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Install the split and gather hooks; returns their handles (``.remove()`` each to undo)."""
    handles = []
    group = mesh.sp_group
    targets = [(rule, resolve_module(component, rule.module, component_name)) for rule in [*splits, *gathers]]

    for rule, module in targets:
        is_split = isinstance(rule, SequenceSplit)
        where = _where(component_name, rule, "split" if is_split else "gather")

        def transform(t, rule=rule, where=where, is_split=is_split):
            if is_split and rule.expected_dims is not None and isinstance(t, torch.Tensor) and t.dim() != rule.expected_dims:
                return t  # another variant's layout (a per-sample timestep): it broadcasts, every rank keeps it
            t = _check_tensor(t, rule.dim, where)
            size = t.shape[rule.dim]
            if is_split:
                if size == 1 and (rule.sequence not in state or state.layout(rule.sequence, where).total != 1):
                    return t  # size 1 broadcasts over the tokens (one timestep for all): every rank keeps it
                layout = state.record(rule.sequence, size, where)
                return shard_tensor(t, rule.dim, layout)
            if size == 1 and rule.sequence not in state:
                return t  # a 1-token sequence was never split
            layout = state.layout(rule.sequence, where)
            if t.shape[rule.dim] != layout.shard:
                raise ParallelError(
                    f"{where}: expected this rank's shard of {layout.shard} tokens along dim {rule.dim}, "
                    f"got shape {tuple(t.shape)}"
                )
            state.gathered(rule.sequence)
            return gather_tensor(t, rule.dim, layout, group)

        if rule.at == "input":

            def pre_hook(mod, args, kwargs, rule=rule, where=where, transform=transform):
                return _map_input(mod, args, kwargs, rule.arg, transform, where)

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:

            def hook(mod, args, output, rule=rule, where=where, transform=transform):
                return _map_output(output, rule.arg, transform, where)

            handles.append(module.register_forward_hook(hook))
    return handles
