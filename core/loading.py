"""``core.load``: from a model name to a ready pipeline."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

from . import guards
from .errors import DitkitError, InputError, PluginError, WeightsError
from .pipeline import Pipeline
from .registry import get_registry
from .weights import (
    check_layout,
    check_required_paths,
    component_module,
    deferred_parameters,
    load_component,
    materialize_parameters,
    no_init_weights,
)

__all__ = ["load", "load_spec", "check_call", "resolve_dtype", "default_device"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}") from None


def default_device() -> torch.device:
    return guards.resolve_device(None)


def load(
    name: str,
    preset: str | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    use_usp: bool = False,
    lora=None,
    shard_weights: bool = False,
    offload: str | None = None,
    weight_dtype: str | torch.dtype | None = None,
    **options,
) -> Pipeline:
    """Build the pipeline of a registered model.

    ``name`` is a model name or alias (``core.list_models()``); ``preset`` one of its presets (the
    model's default, normally ``"tiny"``); ``weights`` a local directory in the model's official
    checkpoint layout (needed by presets without random weights; with a random-weight preset it
    loads a checkpoint of that preset's shapes). ``use_usp=True`` runs the components sequence-
    parallel across the ranks of the current ``torchrun`` job (options ``ulysses_degree``,
    ``ring_degree``, ``cfg_parallel``); with ``shard_weights=True`` as well, each rank keeps 1/N
    of every component with repeated blocks and gathers a block just before it runs
    (:mod:`core.parallel.weight_shards`). ``offload`` keeps weights off the device until the call
    that uses them: ``"model"`` (per component), ``"block"`` (per repeated block, option
    ``num_blocks_per_group``), ``"disk"`` (blocks memory-mapped in the checkpoint files; needs
    ``weights``) or ``"auto"`` (the least that fits; :mod:`core.offload`); with ``shard_weights``
    only ``"block"``, which keeps each rank's shards in host memory. ``weight_dtype="float8_e4m3fn"``
    (opt-in, lossy) stores linear weights in fp8 and casts them per call (:mod:`core.fp8_weights`).
    ``lora=[(path, scale), ...]`` loads LoRAs (docs/lora.md; ``(path, scale, component)`` for a model
    with several LoRA components). Other ``options`` go to the plugin's pipeline factory.
    """
    record = get_registry().model(name)
    pipe = load_spec(record.spec, preset, weights, device, dtype, use_usp=use_usp, shard_weights=shard_weights,
                     offload=offload, weight_dtype=weight_dtype, _plugin=record.plugin, **options)
    if lora:
        from .lora import load_all

        load_all(pipe, lora)
    return pipe


_USP_OPTIONS = ("ulysses_degree", "ring_degree", "cfg_parallel")
_OFFLOAD_OPTIONS = ("num_blocks_per_group",)
_FACTORY_ARGS = ("config", "device", "dtype", "weights")


def _check_options(spec, options: dict) -> None:
    """Options the factory does not take are an :class:`InputError` naming them and the known ones
    (not the factory's ``TypeError`` after half a build). A factory taking ``**kwargs`` accepts all."""
    try:
        params = inspect.signature(spec.pipeline).parameters
    except (TypeError, ValueError):  # a builtin or C factory: let it judge
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = sorted({n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}
                   - set(_FACTORY_ARGS) | set(_USP_OPTIONS) | set(_OFFLOAD_OPTIONS))
    unknown = sorted(set(options) - set(known))
    if unknown:
        import difflib

        hints = [f"{u!r} -> did you mean {c[0]!r}?" for u in unknown
                 if (c := difflib.get_close_matches(u, known, n=1, cutoff=0.6))]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise InputError(f"unknown option(s) {unknown} for model {spec.name!r}{hint}; known options: {known}")


def _device_for(device, use_usp: bool) -> torch.device:
    """The device to build on. Under ``torchrun`` with ``use_usp`` a CUDA request without an index
    (or no request on a CUDA machine) means this rank's GPU, ``cuda:$LOCAL_RANK``, chosen before
    anything is built so no rank ever allocates on another's GPU."""
    dev = guards.resolve_device(device)
    local = os.environ.get("LOCAL_RANK")
    if use_usp and dev.type == "cuda" and dev.index is None and local is not None:
        try:
            index = int(local)
        except ValueError:
            raise InputError(f"LOCAL_RANK={local!r} is not an integer") from None
        dev = guards.resolve_device(f"cuda:{index}")
        torch.cuda.set_device(dev)
    return dev


def _call_factory(spec, plugin: str | None, config, **kwargs):
    """Run the plugin's factory; what it raises beyond the project's own errors is a
    :class:`PluginError` naming the plugin and the model."""
    try:
        return spec.pipeline(config, **kwargs)
    except DitkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin bug must not surface as a bare traceback
        raise PluginError(
            f"plugin {plugin or '?'!r}, model {spec.name!r}: the pipeline factory raised "
            f"{type(exc).__name__}: {exc} (expected a core.Pipeline)"
        ) from exc


def load_spec(spec, preset=None, weights=None, device=None, dtype=None, *, use_usp: bool = False,
              shard_weights: bool = False, offload: str | None = None, weight_dtype=None,
              _plugin: str | None = None, **options) -> Pipeline:
    """:func:`load` for a :class:`core.spec.ModelSpec` in hand (the conformance kit, tests)."""
    preset_name = preset or spec.default_preset
    if preset_name not in spec.presets:
        raise InputError(f"model {spec.name!r} has no preset {preset_name!r}; presets: {', '.join(sorted(spec.presets))}")
    chosen = spec.presets[preset_name]
    _check_options(spec, options)
    device = _device_for(device, use_usp)
    dtype = resolve_dtype(dtype, device)
    usp_options = {k: options.pop(k) for k in _USP_OPTIONS if k in options}
    if usp_options and not use_usp:
        raise InputError(f"{', '.join(usp_options)} need use_usp=True")
    if shard_weights and not use_usp:
        raise InputError("shard_weights=True needs use_usp=True (the weights are sharded over the USP ranks)")
    from .fp8_weights import resolve_weight_dtype

    storage = resolve_weight_dtype(weight_dtype)
    if storage is not None and shard_weights:
        raise InputError("weight_dtype (fp8 storage) and shard_weights cannot be combined yet")
    mode, group = _offload_request(spec, chosen, weights, device, dtype, offload, options, _plugin, shard_weights)
    build_device = torch.device("cpu") if mode is not None else device  # offloaded weights live on the host
    if weights is None:
        if not chosen.random_weights:
            layout = spec.weights.description if spec.weights else ""
            raise WeightsError(
                f"preset {preset_name!r} of {spec.name!r} needs weights=<directory in the official layout>"
                f"{': ' + layout if layout else ''}"
            )
        pipe = _call_factory(spec, _plugin, dict(chosen.config), device=build_device, dtype=dtype, weights=None, **options)
        _store_weights(pipe, storage)
    else:
        pipe = _build_with_weights(spec, chosen, Path(weights), device, dtype, options, _plugin, storage,
                                   offload=(mode, group))
    _attach(pipe, spec, chosen, _plugin)
    if mode is not None:
        from . import offload as offloading

        from .parallel.weight_shards import sharded_components

        # sharded components are left to FSDP, which keeps their blocks' shards on the host
        offloading.apply(pipe, mode, device, num_blocks_per_group=group,
                         sharded=sharded_components(pipe) if shard_weights else ())
    if use_usp:
        from .declarations import check_declarations
        from .parallel import attach_usp

        check_declarations(pipe, compile=False)  # a wrong submodule name: a PluginError before the mesh starts
        attach_usp(pipe, config=dict(chosen.config), **usp_options)
        if shard_weights:
            from .parallel.weight_shards import shard_pipeline

            shard_pipeline(pipe, shards_on_host=mode == "block")
    return pipe


def _store_weights(pipe, storage) -> None:
    if storage is not None:
        from .fp8_weights import store_linear_weights

        store_linear_weights(pipe.components(), storage)
        pipe.lossy = f"linear weights stored in {str(storage).removeprefix('torch.')} (weight_dtype)"


def _attach(pipe, spec, preset, plugin: str | None = None) -> None:
    if not isinstance(pipe, Pipeline):
        raise PluginError(f"plugin {plugin or '?'!r}, model {spec.name!r}: the pipeline factory returned "
                          f"{type(pipe).__name__}, expected a core.Pipeline")
    pipe.spec = spec
    if plugin is not None:
        pipe.plugin_name = plugin
    pipe.preset_defaults = dict(preset.defaults)
    pipe.preset_config = dict(preset.config)


def _on_meta(spec, plugin, preset, dtype, weights: Path | None, options: dict) -> Pipeline:
    """The preset's pipeline built on the meta device (shapes only, nothing allocated), attached to
    its spec: what the offload estimate, the checkpoint's header check and ``check_call`` read."""
    with torch.device("meta"):
        meta = _call_factory(spec, plugin, dict(preset.config), device=torch.device("meta"), dtype=dtype,
                             weights=weights, **options)
    _attach(meta, spec, preset, plugin)
    return meta


def _offload_request(spec, preset, weights, device, dtype, offload, options, plugin,
                     shard_weights: bool = False) -> tuple[str | None, int]:
    """The offload mode (``"auto"`` resolved against the device's free memory) and group size."""
    from . import offload as offloading

    mode = offloading.resolve_mode(offload, has_weights=weights is not None, shard_weights=shard_weights)
    group = offloading.check_group_size(options.pop("num_blocks_per_group", 1))
    if mode is None and group != 1:
        raise InputError("num_blocks_per_group needs offload='block' or 'disk'")
    if mode == "auto":
        meta = _on_meta(spec, plugin, preset, dtype, None if weights is None else Path(weights), options)
        estimated = meta.estimate_bytes(meta.resolve(prompt="x"))
        mode = offloading.choose_mode(offloading.footprint(meta, group), device, int(estimated or 0),
                                      disk_possible=weights is not None, what=f"{spec.name!r}")
    return mode, group


def _build_with_weights(spec, preset, root: Path, device, dtype, options, plugin=None, storage=None,
                        offload: tuple[str | None, int] = (None, 1)) -> Pipeline:
    from .weight_reader import LoadStats

    if spec.weights is None:
        raise WeightsError(f"model {spec.name!r} declares no checkpoint layout, so weights= cannot be used")
    layout = spec.weights
    check_required_paths(root, layout)
    config = dict(preset.config)
    # 1. shapes only: build on the meta device and compare every file's header with it
    meta = _on_meta(spec, plugin, preset, dtype, root, options)
    checked = [check_layout(root, wf, component_module(meta, wf.component)) for wf in layout.files]
    del meta
    # 2. build for real without random init
    mode, group = offload
    if mode == "disk":  # parameters never allocated: the blocks stay in the mapped files
        from .offload import load_mapped

        build_device = torch.device("cpu") if device.type != "cpu" else device
        with no_init_weights(), deferred_parameters():
            pipe = _call_factory(spec, plugin, config, device=build_device, dtype=dtype, weights=root, **options)
        _store_weights(pipe, storage)
        load_mapped(pipe, layout, root, checked, device, dict(spec.repeated_blocks), group)
        return pipe
    # parameters deferred: they get memory only now, in their final dtype on the target device
    # (on CUDA nothing model-sized is ever in host memory; offloaded weights live on the host);
    # then each file is read straight into them, cast once (fp8 storage included)
    if mode is not None:
        device = torch.device("cpu")
    try:
        with no_init_weights(), deferred_parameters():
            pipe = _call_factory(spec, plugin, config, device=device, dtype=dtype, weights=root, **options)
        if any(b.device.type == "meta" for m in pipe.components().values() for b in m.buffers()):
            raise PluginError("a buffer was computed from a deferred parameter")
    except DitkitError:  # a factory that computes with its parameters' values: build them for real
        with no_init_weights():
            pipe = _call_factory(spec, plugin, config, device=device, dtype=dtype, weights=root, **options)
    _store_weights(pipe, storage)
    materialize_parameters(pipe.components())
    pipe.load_stats = LoadStats()
    for wf, chk in zip(layout.files, checked):
        if chk is not None:
            load_component(root, wf, component_module(pipe, wf.component), checked=chk, stats=pipe.load_stats)
    return pipe


def check_call(name: str, preset=None, weights=None, device=None, dtype=None, *, prompt: str = "x",
               offload: str | None = None, **call) -> Pipeline:
    """Check a ``core.load(name, ...)(prompt, **call)`` request without loading weights or
    allocating: the model, preset, device, dtype and the generation arguments (``check_inputs`` of
    the pipeline built on the meta device), and whether the weights the ``offload`` mode keeps on
    the device fit with the generation. ``ditkit run`` calls this before any work and before
    spawning ranks, so a bad argument is one error line, not one traceback per rank. Returns the
    pipeline built on the meta device (for further checks of the plugin's declarations)."""
    from . import offload as offloading

    record = get_registry().model(name)
    spec = record.spec
    preset_name = preset or spec.default_preset
    if preset_name not in spec.presets:
        raise InputError(f"model {spec.name!r} has no preset {preset_name!r}; presets: {', '.join(sorted(spec.presets))}")
    chosen = spec.presets[preset_name]
    dev = guards.resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    root = None
    if weights is not None:
        if spec.weights is None:
            raise WeightsError(f"model {spec.name!r} declares no checkpoint layout, so weights= cannot be used")
        root = Path(weights)
        check_required_paths(root, spec.weights)
    elif not chosen.random_weights:
        raise WeightsError(f"preset {preset_name!r} of {spec.name!r} needs weights=<directory in the official layout>")
    mode = offloading.resolve_mode(offload, has_weights=root is not None)
    meta = _on_meta(spec, record.plugin, chosen, dtype, root, {})
    args = meta.resolve(prompt=prompt, **call)
    meta.check_inputs(args)
    # the size check against real memory: the meta pipeline knows the shapes, ``dev`` the room; the
    # weights count as the offload mode places them
    estimated = int(meta.estimate_bytes(args) or 0)
    offloading.check_request(meta, mode, dev, estimated, f"{args.get('height')}x{args.get('width')} with "
                             f"{type(meta).__name__}", has_weights=root is not None)
    return meta
