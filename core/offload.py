"""Offload: weights that live off the compute device and move to it only for the call that uses them.

Everything comes from what a plugin already declares (its components and their repeated blocks);
no model is named here. Modes (``core.load(..., offload=MODE)``):

* ``"model"``: a *unit* per component. A component's parameters stay in their storage copy (host
  memory, pinned on CUDA) and a compute copy is made on the device when the component is called
  (its ``forward``, a method named in ``ModelSpec.compiled_methods``, or any direct submodule, so
  a VAE's ``decode`` counts). It is released when another component is called and it is not itself
  running (components called inside another's call, a bridge between two towers, stay together),
  and at the end of every generation. So the text encoder is on the device while it encodes,
  each expert while it denoises, the VAE while it decodes.
* ``"block"``: a unit per repeated block (or group of ``num_blocks_per_group`` consecutive blocks)
  of every component that declares repeated blocks (``ModelSpec.repeated_blocks``, a
  ``_repeated_blocks`` class attribute, or the ``_no_split_modules`` layers of a transformers model). The compute copy is made just before the group's first
  block runs and released after its last block returns; on CUDA the next group (in the order
  observed during the generation) is copied ahead on a side stream. Every other parameter and
  every buffer stays resident on the device.
* ``"disk"``: as ``"block"``, with the storage copy of the blocks being the checkpoint files
  themselves, memory-mapped (safetensors or ``.pth``): the blocks' bytes are only ever read from
  the page cache, a group at a time, so a model larger than host memory runs. Needs ``weights=``.
* ``"auto"``: the least of ``None``, ``"model"``, ``"block"``, ``"disk"`` whose estimate
  (:func:`needed_bytes`) fits the device (and, for the host copies on CUDA, host memory).

Between calls an offloaded parameter's ``.data`` *is* its storage copy (same memory: the pinned
host tensor, or the mapped file pages; in the file's dtype under ``"disk"``); during the call it
is a fresh compute copy in the pipeline's dtype. The parameter objects never change, and the
compute copies are ordinary tensors made outside inference mode, so a compiled block sees the
same guards whatever memory its parameters occupy: no recompilation when blocks move. On a CPU
the compute device is the CPU, and the copy is still made and released, so the mechanism is the
same and observable (``Offload.materialised()``, data pointers).

With weights sharded across ranks (``shard_weights=True``) only ``"block"`` composes
(:func:`shards_conflict` says why the others do not): the sharded components (those with
repeated blocks) are left to FSDP, which keeps each rank's shard of every block in host memory
and copies it to the device just before gathering the block; this module offloads the rest.
fp8 weight storage (``weight_dtype``) composes with every mode: the stored fp8 parameter is what
moves (under ``"disk"``, the mapped file's values cast to fp8 per call).
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from .errors import InputError, WeightsError

__all__ = [
    "MODES", "CHOICES", "Offload", "Footprint", "resolve_mode", "shards_conflict", "footprint", "needed_bytes",
    "choose_mode", "load_mapped", "check_fits", "fit_hint",
]

MODES = ("model", "block", "disk")
"""The offload modes, from least to most offload."""
CHOICES = (None, *MODES, "auto")


def resolve_mode(offload, *, has_weights: bool = True, shard_weights: bool = False) -> str | None:
    """``offload`` checked: ``None``/``"none"`` → ``None``, a mode name, or ``"auto"``; ``"disk"``
    needs a checkpoint (``has_weights``); with ``shard_weights`` only ``"block"`` (:func:`shards_conflict`)."""
    if offload is None or (isinstance(offload, str) and offload.strip().lower() in ("none", "")):
        return None
    value = offload.strip().lower() if isinstance(offload, str) else offload
    if value not in CHOICES:
        raise InputError(f"offload={offload!r} is not an offload mode; use one of None, "
                         + ", ".join(repr(c) for c in CHOICES[1:]))
    if value == "disk" and not has_weights:
        raise InputError("offload='disk' keeps the weights memory-mapped in the checkpoint files, so it needs "
                         "weights=<directory in the official layout>")
    reason = shards_conflict(value) if shard_weights else None
    if reason:
        raise InputError(f"offload={value!r} and shard_weights=True cannot be combined: {reason}; use "
                         f"offload='block' with shard_weights=True (each rank's shard of every block waits in host "
                         f"memory), or offload={value!r} without shard_weights")
    return value


def shards_conflict(mode: str | None) -> str | None:
    """Why offload ``mode`` cannot run on weights sharded across ranks (``shard_weights=True``),
    or ``None`` where it can. Only ``"block"`` composes: FSDP keeps each rank's shard of every
    block in host memory and copies it to the device just before the block's all-gather
    (:func:`core.parallel.weight_shards.shard_pipeline`, ``shards_on_host``); the components
    without repeated blocks get this module's block offload."""
    return {
        "model": "model offload moves whole components to the device per call, and a sharded component is never "
                 "whole (FSDP gathers it one block at a time)",
        "disk": "disk offload keeps the blocks in the memory-mapped checkpoint files, and sharding copies each "
                "rank's 1/N of them into memory of its own",
        "auto": "auto chooses from estimates that do not count sharded weights",
    }.get(mode)


def check_group_size(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"num_blocks_per_group must be a positive integer, got {n!r}")
    return n


# ---------------------------------------------------------------------------------------------
# Which parameters go in which unit: from the components and their repeated blocks.


def _block_instances(module: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """The outermost submodules whose class name is one of ``names``, in module order."""
    names = set(names)
    found: list[tuple[str, nn.Module]] = []
    for path, m in module.named_modules():
        if not path or type(m).__name__ not in names:
            continue
        if any(path.startswith(p + ".") for p, _ in found):
            continue  # inside a block already taken
        found.append((path, m))
    return found


def offload_block_names(module: nn.Module, declared: Iterable[str] = ()) -> list[str]:
    """The block classes block offload moves one at a time in ``module``: its repeated blocks
    (declared, or ``_repeated_blocks``) and the layers transformers models name in
    ``_no_split_modules`` (the units its own device placement never splits: a text encoder's
    decoder layers)."""
    from .compile import repeated_block_names

    return list(dict.fromkeys([*repeated_block_names(module, declared),
                               *(getattr(type(module), "_no_split_modules", None) or ())]))


@dataclass
class _UnitPlan:
    name: str  # "component" or "component:blocks.3" / "component:blocks.2-3"
    component: str
    modules: list[nn.Module]
    prefixes: list[str]  # module paths inside the component ("" for the whole component)


def _plan_units(components: Mapping[str, nn.Module], mode: str, repeated_blocks: Mapping[str, Iterable[str]],
                group: int) -> list[_UnitPlan]:
    plans: list[_UnitPlan] = []
    for cname, module in components.items():
        if mode == "model":
            plans.append(_UnitPlan(cname, cname, [module], [""]))
            continue
        blocks = _block_instances(module, offload_block_names(module, repeated_blocks.get(cname, ())))
        for i in range(0, len(blocks), group):
            chunk = blocks[i:i + group]
            label = chunk[0][0] if len(chunk) == 1 else f"{chunk[0][0]}..{chunk[-1][0]}"
            plans.append(_UnitPlan(f"{cname}:{label}", cname, [m for _, m in chunk], [p for p, _ in chunk]))
    return plans


def _assign(components: Mapping[str, nn.Module], plans: list[_UnitPlan]) -> dict[int, int]:
    """``id(parameter) -> unit index`` for every parameter that belongs to exactly one unit and to
    nothing outside it (a parameter tied across units, or to a module outside any unit, stays resident)."""
    owner: dict[int, int | None] = {}
    by_component: dict[str, list[tuple[int, str]]] = {}
    for i, plan in enumerate(plans):
        for prefix in plan.prefixes:
            by_component.setdefault(plan.component, []).append((i, prefix))
    for cname, module in components.items():
        spans = by_component.get(cname, [])
        for path, p in module.named_parameters(remove_duplicate=False):
            unit = None
            for i, prefix in spans:
                if prefix == "" or path.startswith(prefix + "."):
                    unit = i
                    break
            key = id(p)
            if key in owner and owner[key] != unit:
                owner[key] = None
            else:
                owner.setdefault(key, unit)
    return {k: v for k, v in owner.items() if v is not None}


def _components(pipe) -> dict[str, nn.Module]:
    return pipe.components()


def _declared(pipe, field_name: str) -> dict[str, list[str]]:
    spec = getattr(pipe, "spec", None)
    return dict(getattr(spec, field_name, {}) or {}) if spec is not None else {}


# ---------------------------------------------------------------------------------------------
# Memory estimates per mode


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Footprint:
    """Bytes of a pipeline's weights, as each mode places them (parameters in the pipeline's dtype)."""

    total: int
    """Every parameter and buffer."""
    components: dict[str, int] = field(default_factory=dict)
    """Per component: its parameters (one shared by two components counted in the first)."""
    buffers: int = 0
    blocks: int = 0
    """Parameters that block/disk offload moves (the repeated blocks')."""
    group: int = 0
    """The largest group of blocks (``num_blocks_per_group`` consecutive blocks)."""


def footprint(pipe_or_components, num_blocks_per_group: int = 1, repeated_blocks: Mapping | None = None) -> Footprint:
    """The :class:`Footprint` of a pipeline (real or built on the meta device) or of a
    ``{name: module}`` mapping with its ``repeated_blocks``."""
    if isinstance(pipe_or_components, Mapping):
        components, declared = dict(pipe_or_components), dict(repeated_blocks or {})
    else:
        components, declared = _components(pipe_or_components), _declared(pipe_or_components, "repeated_blocks")
    seen: set[int] = set()
    fp = Footprint(total=0)
    for cname, module in components.items():
        fp.components[cname] = 0
        for kind, tensors in (("param", module.parameters()), ("buffer", module.buffers())):
            for t in tensors:
                if id(t) in seen:
                    continue
                seen.add(id(t))
                if kind == "param":
                    fp.components[cname] += _nbytes(t)
                else:
                    fp.buffers += _nbytes(t)
    fp.total = sum(fp.components.values()) + fp.buffers
    plans = _plan_units(components, "block", declared, num_blocks_per_group)
    owner = _assign(components, plans)
    sizes = [0] * len(plans)
    counted: set[int] = set()
    for plan_index, plan in enumerate(plans):
        for m in plan.modules:
            for p in m.parameters():
                if owner.get(id(p)) == plan_index and id(p) not in counted:
                    counted.add(id(p))
                    sizes[plan_index] += _nbytes(p)
    fp.blocks = sum(sizes)
    fp.group = max(sizes, default=0)
    return fp


def needed_bytes(fp: Footprint, mode: str | None, device: torch.device | str) -> tuple[int, int]:
    """``(device bytes, host bytes)`` the weights take under ``mode`` at their peak, for compute on
    ``device``. On a CPU both live in the same memory, so the host figure is 0 and the device
    figure holds everything: the storage copies *and* the compute copies (model and block then
    need more than no offload; only disk needs less). With a prefetch (CUDA, and disk) two
    groups are on the device at once. ``"model"``'s figure is the largest component: a lower
    bound, since components called inside one another's call are on the device together."""
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    prefetch = 2 if (device.type == "cuda" or mode == "disk") else 1
    if mode is None:
        return fp.total, 0
    if mode == "model":
        largest = max(fp.components.values(), default=0)
        if on_cpu:
            return fp.total + largest, 0
        return fp.total - sum(fp.components.values()) + largest, sum(fp.components.values())
    resident = fp.total - fp.blocks
    moving = min(fp.blocks, prefetch * fp.group)
    if mode == "block":
        return (fp.total + moving, 0) if on_cpu else (resident + moving, fp.blocks)
    if mode == "disk":
        return resident + moving, 0
    raise InputError(f"unknown offload mode {mode!r}")


def _fits(fp: Footprint, mode, device: torch.device, activations: int, free_device, free_host,
          credit: int = 0) -> bool:
    dev, host = needed_bytes(fp, mode, device)
    if free_device is not None and dev + activations > free_device + credit:
        return False
    return free_host is None or host <= free_host


def _free(device: torch.device) -> tuple[int | None, int | None]:
    from .guards import available_bytes

    free_device = available_bytes(device)
    free_host = available_bytes(torch.device("cpu")) if device.type != "cpu" else None
    return free_device, free_host


def choose_mode(fp: Footprint, device: torch.device, activations: int = 0, *, disk_possible: bool = True,
                what: str = "the model") -> str | None:
    """``offload="auto"``: the least offload whose estimate fits ``device`` now (``None`` first)."""
    from .guards import format_bytes

    device = torch.device(device)
    free_device, free_host = _free(device)
    for mode in (None, *MODES):
        if mode == "disk" and not disk_possible:
            continue
        if _fits(fp, mode, device, activations, free_device, free_host):
            return mode
    dev, _ = needed_bytes(fp, "disk" if disk_possible else "block", device)
    raise InputError(
        f"{what} does not fit {device} with any offload: offload="
        f"{'disk' if disk_possible else 'block'!r} needs about {format_bytes(dev + activations)}, "
        f"{format_bytes(free_device or 0)} is available"
        + ("" if disk_possible else " (offload='disk' needs weights=<checkpoint directory>)")
    )


def check_request(meta, mode: str | None, device, activations: int, what: str, *, has_weights: bool,
                  num_blocks_per_group: int = 1) -> str | None:
    """Before anything is loaded: the weights ``mode`` keeps on ``device`` plus ``activations``
    against its free memory (and, on CUDA, the host copies against host memory), for a pipeline
    built on the meta device. Resolves ``"auto"``; returns the mode. The error names the least
    offload that would fit."""
    from .guards import format_bytes

    device = torch.device(device)
    fp = footprint(meta, num_blocks_per_group)
    if mode == "auto":
        return choose_mode(fp, device, activations, disk_possible=has_weights, what=what)
    free_device, free_host = _free(device)
    if _fits(fp, mode, device, activations, free_device, free_host):
        return mode
    dev, host = needed_bytes(fp, mode, device)
    where = (f"{format_bytes(dev + activations)} on {device} ({format_bytes(free_device or 0)} available)"
             if free_device is not None and dev + activations > free_device else
             f"{format_bytes(host)} of host memory for the offloaded weights ({format_bytes(free_host or 0)} available)")
    hint = fit_hint(fp, mode, device, activations, loaded=False)
    if not has_weights:
        hint = hint.replace("offload='disk' with weights=<checkpoint directory> would fit",
                            "offload='disk' would fit with weights=<checkpoint directory>")
    raise InputError(f"{what} with offload={mode!r} needs at least {where}; {hint}")


def fit_hint(fp: Footprint, current: str | None, device: torch.device, activations: int, *,
             loaded: bool) -> str:
    """The clause a "does not fit" error ends with: the least offload (beyond ``current``) that
    would fit, or the general advice. ``loaded``: the pipeline's weights already occupy the
    device (so what ``current`` keeps there is credited back)."""
    device = torch.device(device)
    free_device, free_host = _free(device)
    credit = needed_bytes(fp, current, device)[0] - _transient(fp, current, device) if loaded else 0
    order = (None, *MODES)
    for mode in order[order.index(current) + 1:]:
        if _fits(fp, mode, device, activations, free_device, free_host, credit):
            extra = " with weights=<checkpoint directory>" if mode == "disk" else ""
            return f"offload={mode!r}{extra} would fit (core.load(..., offload={mode!r}), ditkit run --offload {mode})"
    return "use a smaller size (or tiled decoding where the model has it)"


def _transient(fp: Footprint, mode, device: torch.device) -> int:
    """Weight bytes a call materialises on the device beyond what stays there between calls."""
    device = torch.device(device)
    if mode is None:
        return 0
    if mode == "model":
        return max(fp.components.values(), default=0)
    prefetch = 2 if (device.type == "cuda" or mode == "disk") else 1
    return min(fp.blocks, prefetch * fp.group)


def check_fits(pipe, activations: int, what: str) -> None:
    """The generation's estimate against the free memory of ``pipe.device``: the activations
    (``Pipeline.estimate_bytes``) plus what the pipeline's offload mode materialises during the
    call; the error names the offload mode that would fit."""
    from . import guards

    off = getattr(pipe, "offload", None)
    mode = off.mode if off is not None else None
    device = pipe.device
    need = activations + (_transient(off.footprint, mode, device) if off is not None else 0)
    free = guards.available_bytes(device)
    if free is None or need <= free:
        return
    fp = off.footprint if off is not None else _cached_footprint(pipe)
    guards.check_fits(need, device, what, hint=fit_hint(fp, mode, device, activations, loaded=True))


def _cached_footprint(pipe) -> Footprint:
    fp = pipe.__dict__.get("_ditkit_footprint")
    if fp is None:
        fp = footprint(pipe)
        pipe.__dict__["_ditkit_footprint"] = fp
    return fp


# ---------------------------------------------------------------------------------------------
# Disk mode: the pipeline built without parameter memory, then the checkpoint mapped


def load_mapped(pipe, layout, root, checked, device: torch.device, repeated_blocks: Mapping,
                group: int) -> None:
    """Fill a pipeline built under :func:`core.weights.deferred_parameters` (no parameter memory:
    a factory's ``.to(dtype)`` writes no copy; buffers real) from its checkpoint: the repeated
    blocks' parameters become the memory-mapped checkpoint tensors themselves (their storage copy
    under ``offload="disk"``; the pipeline's dtype is kept as their compute dtype), every other
    parameter a resident copy on ``device``. A parameter no file fills is a :class:`WeightsError`."""
    from .weights import component_module

    components = _components(pipe)
    plans = _plan_units(components, "block", repeated_blocks, group)
    owner = _assign(components, plans)
    compute_dtypes: dict[int, torch.dtype] = pipe.__dict__.setdefault("_ditkit_compute_dtypes", {})
    replaced: dict[int, nn.Parameter] = {}
    for wf, chk in zip(layout.files, checked):
        if chk is None:
            continue
        ckpt, mapping = chk
        module = component_module(pipe, wf.component)
        try:
            tensors = ckpt.tensors(list(mapping.values()))
        except (OSError, RuntimeError, ValueError) as exc:
            files = ", ".join(str(p) for p in ckpt.files[:3])
            raise WeightsError(f"cannot map checkpoint {files} for component {wf.component!r}: "
                               f"{type(exc).__name__}: {exc}") from exc
        for mk, ck in mapping.items():
            owner_module, _, name = mk.rpartition(".")
            sub = module.get_submodule(owner_module) if owner_module else module
            t = tensors[ck]
            if name in sub._parameters:
                old = sub._parameters[name]
                new = replaced.get(id(old))
                if new is None:
                    with torch.no_grad():
                        if id(old) in owner:  # an offloaded block parameter: the mapped tensor is its home
                            new = nn.Parameter(t, requires_grad=old.requires_grad)
                            compute_dtypes[id(new)] = old.dtype
                        else:
                            new = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=device).copy_(t),
                                               requires_grad=old.requires_grad)
                    replaced[id(old)] = new
                sub._parameters[name] = new
            elif name in sub._buffers and sub._buffers[name] is not None:
                with torch.no_grad():
                    sub._buffers[name].copy_(t)
    for cname, module in components.items():
        for path, p in module.named_parameters():
            if p.device.type == "meta":
                raise WeightsError(f"offload='disk': parameter {path!r} of component {cname!r} is in no checkpoint "
                                   f"file of the layout, so there is nothing to map it from")


# ---------------------------------------------------------------------------------------------
# The mechanism


class _Unit:
    """One offloaded unit: parameters, their storage copies and compute dtypes, and its state."""

    __slots__ = ("name", "component", "params", "homes", "dtypes", "nbytes", "copies", "pending", "loads",
                 "running", "modules")

    def __init__(self, name: str, component: str, modules: list[nn.Module]):
        self.name, self.component, self.modules = name, component, modules
        self.params: list[nn.Parameter] = []
        self.homes: list[torch.Tensor] = []
        self.dtypes: list[torch.dtype] = []
        self.nbytes = 0
        self.copies: list[torch.Tensor] | None = None  # the compute copies while materialised
        self.pending: Future | None = None  # a prefetch in flight
        self.loads = 0  # how many times it was materialised
        self.running = 0  # model mode: calls of the component in progress

    def __repr__(self) -> str:
        state = "on device" if self.copies is not None else ("prefetching" if self.pending else "stored")
        return f"<unit {self.name}: {len(self.params)} parameters, {self.nbytes} bytes, {state}>"


class Offload:
    """The offload state of one pipeline (``pipe.offload``): see the module docstring.

    ``components``: ``{name: module}``; ``repeated_blocks`` and ``methods`` as in the ModelSpec
    (``repeated_blocks``, ``compiled_methods``). ``compute_dtypes`` (``id(param) -> dtype``) names
    parameters whose storage copy has another dtype than their compute copy (disk)."""

    def __init__(self, components: Mapping[str, nn.Module], mode: str, device, *, num_blocks_per_group: int = 1,
                 repeated_blocks: Mapping | None = None, methods: Mapping | None = None,
                 compute_dtypes: Mapping[int, torch.dtype] | None = None, prefetch: bool | None = None):
        if mode not in MODES:
            raise InputError(f"offload mode {mode!r} is not one of {MODES}")
        self.mode, self.device = mode, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.group = check_group_size(num_blocks_per_group)
        self._components = dict(components)
        self._repeated = dict(repeated_blocks or {})
        self._methods = dict(methods or {})
        self._cuda = self.device.type == "cuda"
        self.prefetch = (mode != "model" and (self._cuda or mode == "disk")) if prefetch is None else prefetch
        self.footprint = footprint(self._components, self.group, self._repeated)
        self.units: list[_Unit] = []
        self._handles: list = []
        self._wrapped: list[tuple[nn.Module, str]] = []
        self._next: dict[int, _Unit] = {}  # learned order: unit id -> the unit that ran after it
        self._last: _Unit | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stream = None
        self._lock = threading.Lock()
        self._registered: list[torch.Tensor] = []  # host buffers page-locked in place (CUDA)
        weakref.finalize(self, _unregister_host, self._registered)
        self.sharded: tuple[str, ...] = ()
        """Components left to FSDP's own offload of their shards (set by :func:`apply`)."""
        self.bytes_on_device = 0
        self.peak_bytes_on_device = 0
        """Compute copies (and prefetches) of offloaded units at once, now and at the peak."""
        self._build(dict(compute_dtypes or {}))

    # -- setup -------------------------------------------------------------------------------
    def _build(self, compute_dtypes: dict[int, torch.dtype]) -> None:
        plans = _plan_units(self._components, self.mode, self._repeated, self.group)
        owner = _assign(self._components, plans)
        self.units = [_Unit(p.name, p.component, p.modules) for p in plans]
        seen: set[int] = set()
        with torch.no_grad():
            for index, (plan, unit) in enumerate(zip(plans, self.units)):
                for m in plan.modules:
                    for p in m.parameters():
                        if owner.get(id(p)) != index or id(p) in seen:
                            continue
                        seen.add(id(p))
                        dtype = compute_dtypes.get(id(p), p.dtype)
                        unit.params.append(p)
                        unit.dtypes.append(dtype)
                        unit.nbytes += p.numel() * dtype.itemsize
                unit.homes = self._storage_copies([p.data for p in unit.params])
                for p, home in zip(unit.params, unit.homes):
                    p.data = home
            # every other parameter and every buffer lives on the compute device
            for module in self._components.values():
                for p in module.parameters():
                    if id(p) not in seen and p.device != self.device:
                        p.data = p.data.to(self.device)
                for m in module.modules():
                    for k, b in m._buffers.items():
                        if b is not None and b.device != self.device:
                            m._buffers[k] = b.to(self.device)
        self.units = [u for u in self.units if u.params]
        self._install_hooks()

    def _storage_copies(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The homes of one unit's parameters, in host memory. On CUDA (model, block) they are
        views of one buffer per unit, page-locked in place (``cudaHostRegister``) so copies to the
        device are asynchronous; pinning tensor by tensor would round each up to a power of two in
        the caching host allocator. A memory-mapped or host tensor is otherwise kept as it is."""
        tensors = [t if t.device.type == "cpu" else t.to("cpu") for t in tensors]
        if not (self._cuda and self.mode != "disk") or not tensors or all(t.is_pinned() for t in tensors):
            return tensors
        align, page = 256, 4096
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // align) * align
        total = -(-total // page) * page
        # whole pages of its own: a registration never overlaps another's pages
        base = torch.empty(total + page, dtype=torch.uint8)
        start = -base.data_ptr() % page
        flat = base[start:start + total]
        homes = []
        for t, offset in zip(tensors, offsets):
            view = flat[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            view.copy_(t)
            homes.append(view)
        if _register_host(flat):
            self._registered.append(flat)
            return homes
        pinned = flat.pin_memory()  # no in-place registration: one pinned copy per unit
        return [pinned[o:o + h.numel() * h.element_size()].view(h.dtype).view(h.shape) for h, o in zip(homes, offsets)]

    def _install_hooks(self) -> None:
        if self.mode == "model":
            for unit in self.units:
                (root,) = unit.modules
                self._handles.append(root.register_forward_pre_hook(functools.partial(self._enter_call, unit)))
                self._handles.append(root.register_forward_hook(functools.partial(self._leave_call, unit),
                                                                always_call=True))
                for child in root.children():
                    self._handles.append(child.register_forward_pre_hook(functools.partial(self._touch, unit)))
            self.rewrap()
            return
        for unit in self.units:
            for m in unit.modules:
                self._handles.append(m.register_forward_pre_hook(functools.partial(self._enter_block, unit)))
            self._handles.append(unit.modules[-1].register_forward_hook(functools.partial(self._leave_block, unit),
                                                                        always_call=True))

    def rewrap(self) -> None:
        """Model mode: route the methods a pipeline calls on a component (``compiled_methods``)
        through the component's unit. ``compile_pipeline`` calls it again after binding compiled
        methods, so the compiled method runs inside the wrapper."""
        if self.mode != "model":
            return
        self._unwrap()
        by_component = {u.component: u for u in self.units}
        for cname, names in self._methods.items():
            unit = by_component.get(cname)
            if unit is None:
                continue
            (root,) = unit.modules
            for name in names:
                if name == "forward" or not callable(getattr(root, name, None)):
                    continue
                bound = root.__dict__.get(name)  # a compiled method bound to the instance, if any
                inner = bound if bound is not None else getattr(root, name)
                root.__dict__[name] = self._method(unit, inner)
                self._wrapped.append((root, name, bound))

    def _unwrap(self) -> None:
        for module, name, previous in self._wrapped:
            current = module.__dict__.get(name)
            if getattr(current, "_ditkit_offload_inner", None) is None:
                continue  # replaced since (compile bound its own): leave it
            if previous is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = previous
        self._wrapped = []

    def check_compile(self, options: Mapping) -> None:
        """CUDA graphs replay fixed parameter addresses, which offload changes at every call."""
        from .errors import CompileError

        if options.get("mode") in ("reduce-overhead", "max-autotune"):
            raise CompileError(f"compile mode {options['mode']!r} records CUDA graphs, whose parameter addresses "
                               f"offload={self.mode!r} changes at every call; use mode='default' or "
                               f"'max-autotune-no-cudagraphs'")

    def compiled(self, report) -> None:
        """After ``compile_pipeline``: the compiled methods bound to a component run inside its unit."""
        self.rewrap()

    def _method(self, unit: _Unit, inner):
        @functools.wraps(inner)
        def call(*args, **kwargs):
            self._enter_call(unit, None, None)
            try:
                return inner(*args, **kwargs)
            finally:
                self._leave_call(unit, None, None, None)

        call._ditkit_offload_inner = inner
        return call

    # -- hooks -------------------------------------------------------------------------------
    def _enter_call(self, unit: _Unit, module, args) -> None:
        unit.running += 1
        if unit.copies is None:
            self._evict_idle(unit)
            self._load(unit)

    def _leave_call(self, unit: _Unit, module, args, output) -> None:
        unit.running -= 1

    def _touch(self, unit: _Unit, module, args) -> None:
        if torch.compiler.is_compiling():  # inside a compiled method: its wrapper loaded the unit
            return
        if unit.copies is None:
            self._evict_idle(unit)
            self._load(unit)

    def _evict_idle(self, keep: _Unit) -> None:
        for other in self.units:
            if other is not keep and other.copies is not None and other.running == 0:
                self._release(other)

    def _enter_block(self, unit: _Unit, module, args) -> None:
        if unit.copies is None:
            self._load(unit)
        if self._last is not unit:
            if self._last is not None:
                self._next[id(self._last)] = unit
            self._last = unit
            if self.prefetch:
                self._prefetch(self._next.get(id(unit)))

    def _leave_block(self, unit: _Unit, module, args, output) -> None:
        self._release(unit)

    # -- moving ------------------------------------------------------------------------------
    def _copies(self, unit: _Unit, side_stream: bool) -> tuple[list[torch.Tensor], object]:
        """Compute copies of ``unit``'s storage copies (ordinary tensors, made outside inference
        mode: a compiled block guards on that). On CUDA under ``side_stream`` they are copied on
        the side stream and an event marks their arrival."""
        with torch.inference_mode(False), torch.no_grad():
            if not self._cuda:
                return [torch.empty(h.shape, dtype=d, device=self.device).copy_(h)
                        for h, d in zip(unit.homes, unit.dtypes)], None
            stream = self._side_stream() if side_stream else torch.cuda.current_stream(self.device)
            with torch.cuda.stream(stream):
                out = []
                for h, d in zip(unit.homes, unit.dtypes):
                    if not h.is_pinned():  # mapped file pages: through a pinned staging buffer
                        staged = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
                        staged.copy_(h)
                        h = staged
                    t = torch.empty(h.shape, dtype=h.dtype, device=self.device).copy_(h, non_blocking=True)
                    out.append(t if d == h.dtype else t.to(d))  # a cast, on the device
                event = torch.cuda.Event()
                event.record(stream)
            return out, event

    def _side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _account(self, delta: int) -> None:
        with self._lock:
            self.bytes_on_device += delta
            self.peak_bytes_on_device = max(self.peak_bytes_on_device, self.bytes_on_device)

    def _load(self, unit: _Unit) -> None:
        if unit.pending is not None:
            copies, event = unit.pending.result()
            unit.pending = None
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for t in copies:
                    t.record_stream(current)  # freed after the compute stream is done with it
        else:
            self._account(unit.nbytes)
            copies, _ = self._copies(unit, side_stream=False)
        for p, t in zip(unit.params, copies):
            p.data = t
        unit.copies = copies
        unit.loads += 1

    def _release(self, unit: _Unit) -> None:
        if unit.copies is None:
            return
        for p, home in zip(unit.params, unit.homes):
            p.data = home
        unit.copies = None
        self._account(-unit.nbytes)

    def _prefetch(self, unit: _Unit | None) -> None:
        if unit is None or unit.copies is not None or unit.pending is not None:
            return
        for other in self.units:  # one prefetch in flight: a stale guess is dropped
            if other.pending is not None:
                self._drop_pending(other)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ditkit-offload")
        self._account(unit.nbytes)
        unit.pending = self._pool.submit(self._copies, unit, True)

    def _drop_pending(self, unit: _Unit) -> None:
        future, unit.pending = unit.pending, None
        if future is not None:
            future.result()  # let the copy finish before its memory is reused
            self._account(-unit.nbytes)

    # -- generation boundaries ------------------------------------------------------------------
    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """Around one generation: everything is back in its storage copy when it ends (also on an
        error), and the next generation learns its order afresh."""
        try:
            yield
        finally:
            self.release_all()

    def release_all(self) -> None:
        for unit in self.units:
            self._drop_pending(unit)
            self._release(unit)
            unit.running = 0
        self._last = None

    # -- inspection ----------------------------------------------------------------------------
    def materialised(self) -> list[str]:
        """Names of the units whose compute copy exists now."""
        return [u.name for u in self.units if u.copies is not None]

    def offloaded_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def detach(self) -> None:
        """Remove the hooks and wrapped methods, leaving every offloaded parameter in its storage
        copy (host memory): another mode can then be applied without copying the weights again
        (page-locked host copies stay page-locked for the rest of the process)."""
        self._unhook()
        _KEPT_REGISTERED.extend(self._registered)
        self._registered.clear()

    def _unhook(self) -> None:
        self.release_all()
        for h in self._handles:
            h.remove()
        self._handles = []
        self._unwrap()

    def remove(self) -> None:
        """Undo: every offloaded parameter gets a permanent copy on the compute device, hooks and
        wrapped methods go."""
        self._unhook()
        for unit in self.units:
            self._load(unit)
            unit.copies = None
        self.units = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._registered:
            torch.cuda.synchronize(self.device)
            _unregister_host(self._registered)

    def __repr__(self) -> str:
        from .guards import format_bytes

        sharded = f", sharded={list(self.sharded)} (their shards wait in host memory)" if self.sharded else ""
        return (f"Offload(mode={self.mode!r}, device={self.device}, units={len(self.units)}, "
                f"offloaded={format_bytes(self.offloaded_bytes())}, group={self.group}{sharded})")


def _register_host(flat: torch.Tensor) -> bool:
    """Page-lock ``flat``'s memory in place for asynchronous device copies; False where CUDA refuses."""
    try:
        return int(torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel(), 0)) == 0
    except (AttributeError, RuntimeError):
        return False


_KEPT_REGISTERED: list[torch.Tensor] = []
"""Page-locked host buffers handed from a detached offload to whatever uses them next."""


def _unregister_host(flats: list[torch.Tensor]) -> None:
    while flats:
        torch.cuda.cudart().cudaHostUnregister(flats.pop().data_ptr())


def apply(pipe, mode: str, device, *, num_blocks_per_group: int = 1, prefetch: bool | None = None,
          sharded: Iterable[str] = ()) -> Offload:
    """Offload ``pipe``'s components per ``mode`` for compute on ``device``; sets ``pipe.offload``
    and ``pipe.device``. The pipeline's parameters must be on the host (built there, or mapped).
    ``sharded`` names components left to FSDP (``shard_weights=True``), which offloads their shards
    itself."""
    if getattr(pipe, "offload", None) is not None:
        raise InputError(f"{type(pipe).__name__} is already offloaded ({pipe.offload.mode!r})")
    compute_dtypes = pipe.__dict__.pop("_ditkit_compute_dtypes", None)
    if mode == "disk" and compute_dtypes is None:
        raise InputError("offload='disk' keeps the blocks in the memory-mapped checkpoint files: build the pipeline "
                         "with core.load(..., weights=<checkpoint directory>, offload='disk')")
    sharded = tuple(sharded)
    components = {name: module for name, module in _components(pipe).items() if name not in sharded}
    off = Offload(components, mode, device, num_blocks_per_group=num_blocks_per_group,
                  repeated_blocks=_declared(pipe, "repeated_blocks"), methods=_declared(pipe, "compiled_methods"),
                  compute_dtypes=compute_dtypes, prefetch=prefetch)
    off.sharded = sharded
    pipe.offload = off
    pipe.device = off.device
    return off


def remove(pipe, *, keep_on_host: bool = False) -> None:
    """Undo :func:`apply`: every parameter resident on the compute device again (``keep_on_host``:
    offloaded parameters stay in their host copies, for applying another mode)."""
    off = getattr(pipe, "offload", None)
    if off is not None:
        off.detach() if keep_on_host else off.remove()
        pipe.offload = None
