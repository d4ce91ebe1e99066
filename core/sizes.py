"""How big a preset is, without building it: its components' parameters counted on the meta device.

``ditkit plugins --json`` reports these per preset and component, so a user sees that
``wan2.1-t2v-1.3b``'s ``official`` preset holds a 1.42 B-parameter DiT and a 5.7 B-parameter umT5
before downloading anything. Building on the meta device allocates nothing and runs no init.
"""
from __future__ import annotations

import torch

__all__ = ["component_sizes", "preset_sizes", "sizes_report"]

REPORT_DTYPE = torch.bfloat16
"""The dtype the sizes are reported in: what ``core.load`` uses on CUDA by default (components a
plugin keeps in another dtype, such as a float32 VAE, are counted in theirs)."""


def component_sizes(pipe) -> dict[str, dict[str, int]]:
    """``{component: {"parameters": count, "bytes": bytes}}`` of a built pipeline (tied
    parameters counted once)."""
    out = {}
    for name, module in pipe.components().items():
        params = list(module.parameters())  # nn.Module.parameters() yields a tied parameter once
        out[name] = {"parameters": sum(p.numel() for p in params),
                     "bytes": sum(p.numel() * p.element_size() for p in params)}
    return out


_CACHE: dict[tuple, dict] = {}


def preset_sizes(spec, preset: str, dtype: torch.dtype = REPORT_DTYPE) -> dict[str, dict[str, int]]:
    """:func:`component_sizes` of ``spec``'s ``preset``, built on the meta device without
    initialisation (presets that share a factory and a config are built once per process)."""
    import json

    from .weights import no_init_weights

    chosen = spec.presets[preset]
    try:
        key = (spec.pipeline, json.dumps(chosen.config, sort_keys=True, default=repr), dtype)
    except TypeError:
        key = None
    if key is None or key not in _CACHE:
        with torch.device("meta"), no_init_weights():
            pipe = spec.pipeline(dict(chosen.config), device=torch.device("meta"), dtype=dtype, weights=None)
        sizes = component_sizes(pipe)
        if key is None:
            return sizes
        _CACHE[key] = sizes
    return {k: dict(v) for k, v in _CACHE[key].items()}


def sizes_report(spec) -> dict:
    """``{"dtype": "bfloat16", "presets": {preset: {component: {"parameters", "bytes"}}}}`` for
    ``ditkit plugins --json``; a preset whose factory cannot build on the meta device reports
    ``{"error": ...}`` instead of failing the listing."""
    presets = {}
    for name in spec.presets:
        try:
            presets[name] = preset_sizes(spec, name)
        except Exception as exc:  # noqa: BLE001 - a plugin's factory; reported, not raised
            presets[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return {"dtype": str(REPORT_DTYPE).removeprefix("torch."), "presets": presets}
