"""``core.load``: from a model name to a ready pipeline."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import InputError, WeightsError
from .pipeline import Pipeline
from .registry import get_registry
from .weights import check_layout, check_required_paths, component_module, load_component, no_init_weights

__all__ = ["load", "load_spec", "resolve_dtype", "default_device"]

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
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load(
    name: str,
    preset: str | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    use_usp: bool = False,
    **options,
) -> Pipeline:
    """Build the pipeline of a registered model.

    ``name`` is a model name or alias (``core.list_models()``); ``preset`` one of its presets (the
    model's default, normally ``"tiny"``); ``weights`` a local directory in the model's official
    checkpoint layout (needed by presets without random weights; with a random-weight preset it
    loads a checkpoint of that preset's shapes). ``use_usp=True`` runs the components sequence-
    parallel across the ranks of the current ``torchrun`` job (options ``ulysses_degree``,
    ``ring_degree``, ``cfg_parallel``). Other ``options`` go to the plugin's pipeline factory.
    """
    spec = get_registry().model(name).spec
    return load_spec(spec, preset, weights, device, dtype, use_usp=use_usp, **options)


def load_spec(spec, preset=None, weights=None, device=None, dtype=None, *, use_usp: bool = False, **options) -> Pipeline:
    """:func:`load` for a :class:`core.spec.ModelSpec` in hand (the conformance kit, tests)."""
    preset_name = preset or spec.default_preset
    if preset_name not in spec.presets:
        raise InputError(f"model {spec.name!r} has no preset {preset_name!r}; presets: {', '.join(sorted(spec.presets))}")
    chosen = spec.presets[preset_name]
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    usp_options = {k: options.pop(k) for k in ("ulysses_degree", "ring_degree", "cfg_parallel") if k in options}
    if usp_options and not use_usp:
        raise InputError(f"{', '.join(usp_options)} need use_usp=True")
    factory = spec.pipeline
    if weights is None:
        if not chosen.random_weights:
            layout = spec.weights.description if spec.weights else ""
            raise WeightsError(
                f"preset {preset_name!r} of {spec.name!r} needs weights=<directory in the official layout>"
                f"{': ' + layout if layout else ''}"
            )
        pipe = factory(dict(chosen.config), device=device, dtype=dtype, weights=None, **options)
    else:
        pipe = _build_with_weights(spec, chosen, Path(weights), device, dtype, options)
    _attach(pipe, spec, chosen)
    if use_usp:
        from .parallel import attach_usp

        attach_usp(pipe, config=dict(chosen.config), **usp_options)
    return pipe


def _attach(pipe, spec, preset) -> None:
    if not isinstance(pipe, Pipeline):
        raise TypeError(f"the pipeline factory of {spec.name!r} returned {type(pipe).__name__}, not a core.Pipeline")
    pipe.spec = spec
    pipe.preset_defaults = dict(preset.defaults)


def _build_with_weights(spec, preset, root: Path, device, dtype, options) -> Pipeline:
    if spec.weights is None:
        raise WeightsError(f"model {spec.name!r} declares no checkpoint layout, so weights= cannot be used")
    layout = spec.weights
    check_required_paths(root, layout)
    config = dict(preset.config)
    # 1. shapes only: build on the meta device and compare every file's header with it
    with torch.device("meta"):
        meta = spec.pipeline(config, device=torch.device("meta"), dtype=dtype, weights=root, **options)
    checked = [check_layout(root, wf, component_module(meta, wf.component)) for wf in layout.files]
    del meta
    # 2. build for real without random init, fill from the checkpoint, then move
    build_device = torch.device("cpu") if device.type != "cpu" else device
    with no_init_weights():
        pipe = spec.pipeline(config, device=build_device, dtype=dtype, weights=root, **options)
    for wf, chk in zip(layout.files, checked):
        if chk is not None:
            load_component(root, wf, component_module(pipe, wf.component), checked=chk)
    if build_device != device:
        pipe.to(device)
    return pipe
