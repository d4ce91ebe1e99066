"""LoRA adapters fused into a pipeline's weights, in place, several at once, with an exact unload
(docs/lora.md).

A file (or a state dict) is read into *groups*, one per module it patches: a low-rank pair
(``lora_A``/``lora_B``, ``lora_down``/``lora_up``, DiffSynth-Studio's ``lora_A.default``/
``lora_B.default``) with its ``alpha``, or whole-parameter deltas (``diff``, ``diff_b`` and the
plugin's own ``delta_suffixes``). Each group's module name is routed to a component (a declared
key prefix, else the only declared component; ``component=`` takes every key) and translated by the plugin's
:class:`core.spec.LoraKeyMap` naming; flattened kohya names (``lora_unet_blocks_0_attn_q``) are
found by flattening the component's own module names. A key that matches nothing is an error
naming it.

The weights are computed from a copy of the original parameter, never incrementally::

    W = cast(W0₃₂ + Σ_adapters (scale · alpha / rank) · (B₃₂ @ A₃₂) + scale · D₃₂)

(float32 arithmetic, adapters in load order, ``B @ A`` reshaped for convolutions), and written
with ``copy_`` into the existing tensor: no new ``Parameter``, so compiled graphs keep running
without a recompile. ``set_lora_scale`` recomputes the touched parameters from the copies, and
``unload_lora`` copies the originals back, bit for bit (``W + d − d`` is not ``W`` in floating
point, so nothing is subtracted).

Where a parameter's data lives is asked of :attr:`LoraManager.storage` (``(module, name) ->
[tensors]``, the first one being the canonical copy): by default the parameter itself; a
pipeline whose weights live elsewhere (offloaded to the host, or a resident copy beside a host
master) replaces it so every copy is written.
"""
from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import InputError, WeightsError

__all__ = ["LoraManager", "LoraReport", "lora_manager", "read_lora", "parse_lora_arg", "WeightStorage"]

# key suffix -> (role, format label); longest suffixes first so ``.lora_A.default.weight`` wins
_SUFFIXES: tuple[tuple[str, str, str | None], ...] = (
    (".lora_A.default.weight", "down", "diffsynth"),
    (".lora_B.default.weight", "up", "diffsynth"),
    (".lora_B.default.bias", "up_bias", "diffsynth"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora_B.bias", "up_bias", "peft"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora.down.weight", "down", "diffusers-legacy"),
    (".lora.up.weight", "up", "diffusers-legacy"),
    (".alpha", "alpha", None),
)
_DELTAS = {"diff": "weight", "diff_b": "bias"}
"""Whole-parameter deltas (kohya/ComfyUI ``diff``, ``diff_b``): ``W += scale · D``."""
_UNSUPPORTED = {".lora_mid.weight": "LoCon/Tucker mid weights", ".dora_scale": "DoRA magnitudes",
                ".lora_magnitude_vector": "DoRA magnitudes", ".hada_w1_a": "LoHa", ".lokr_w1": "LoKr"}
_WRAPPERS = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "lora_unet_", "lora_transformer_")
"""Prefixes of training tools that name no component (PEFT's wrapper, ComfyUI, kohya): stripped."""
_METADATA_KEY = "lora_adapter_metadata"
"""diffusers' safetensors header entry with the PEFT config of each component (``transformer.lora_alpha``...)."""

WeightStorage = Callable[[nn.Module, str], "list[torch.Tensor]"]


def _is_sharded(param: torch.Tensor) -> bool:
    """A parameter FSDP2 sharded across ranks (a ``DTensor``)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) or isinstance(param.data, DTensor)


def default_storage(module: nn.Module, name: str) -> list[torch.Tensor]:
    """The registered parameter itself (its ``.data``), wherever it lives between calls: in place,
    or the home :mod:`core.offload` gives it (a host copy, or under ``offload="disk"`` the
    copy-on-write mapping of the checkpoint file, which is never written back). The registered
    tensor, not the attribute: fp8 storage (:mod:`core.fp8_weights`) serves ``weight`` as a cast copy.
    A weight sharded across ranks (``shard_weights=True``) holds only this rank's rows: refused."""
    param = module._parameters.get(name)
    if param is None:
        param = getattr(module, name)
    if _is_sharded(param):
        raise InputError(f"LoRA on weights sharded across ranks (shard_weights=True) is not supported: "
                         f"{type(module).__name__}.{name} holds one shard per rank; load the pipeline "
                         f"without shard_weights to use a LoRA")
    return [param.data]


# ---------------------------------------------------------------------------------------------
# Reading


def read_lora(source) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """``(tensors, peft_config, label)`` of a LoRA given as a state dict, a ``.safetensors`` /
    ``.pt`` / ``.pth`` / ``.bin`` file, or a folder holding one (a PEFT ``adapter_model.safetensors``
    with ``adapter_config.json``, or diffusers' ``pytorch_lora_weights.safetensors``).
    ``peft_config`` maps ``"<prefix>.<field>"`` (diffusers' header metadata) or ``"<field>"``
    (``adapter_config.json``) to PEFT config values such as ``lora_alpha``."""
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise InputError(f"a LoRA state dict maps key names to tensors; {bad[:3]} are not")
        return dict(source), {}, "<state dict>"
    if not isinstance(source, (str, Path)):
        raise InputError(f"load_lora takes a file, a folder or a state dict, got {type(source).__name__}")
    path = Path(source)
    config: dict[str, Any] = {}
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            config = json.loads((path / "adapter_config.json").read_text())
        named = [path / n for n in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors") if (path / n).is_file()]
        found = named or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise WeightsError(f"LoRA folder {path} should hold one .safetensors file (adapter_model.safetensors or "
                               f"pytorch_lora_weights.safetensors); found {[p.name for p in found] or 'none'}")
        path = found[0]
    if not path.is_file():
        raise WeightsError(f"LoRA file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if header.get(_METADATA_KEY):
                config.update(json.loads(header[_METADATA_KEY]))
        elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
            tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(tensors, Mapping) and isinstance(tensors.get("state_dict"), Mapping):
                tensors = tensors["state_dict"]
            if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
                raise WeightsError(f"LoRA file {path} should hold a dict of tensors")
            tensors = dict(tensors)
        else:
            raise WeightsError(f"LoRA file {path}: unknown format {path.suffix!r} (use .safetensors, .pt, .pth or .bin)")
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is the user's file's fault
        raise WeightsError(f"LoRA file {path} could not be read: {type(exc).__name__}: {exc}") from exc
    return tensors, config, str(path)


def parse_lora_arg(text: str) -> tuple[str, float, str | None]:
    """``[COMPONENT=]FILE[:SCALE]`` (the CLI's ``--lora``) -> ``(file, scale, component)``."""
    component = None
    head, sep, rest = text.partition("=")
    if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", head):
        component, text = head, rest
    path, scale = text, 1.0
    stem, sep, tail = text.rpartition(":")
    if sep and stem:
        try:
            scale = float(tail)
        except ValueError:
            pass
        else:
            path = stem
    if not path:
        raise InputError(f"--lora {text!r}: expected [COMPONENT=]FILE[:SCALE]")
    return path, scale, component


# ---------------------------------------------------------------------------------------------
# Groups: one per patched module


@dataclass
class _Group:
    raw: str  # the module name as the file spells it (prefix included)
    keys: dict[str, str] = field(default_factory=dict)  # role -> file key
    formats: set[str] = field(default_factory=set)


def _split_key(key: str, delta_suffixes: dict[str, str]) -> tuple[str, str, str | None] | None:
    """``(stem, role, format)`` of a file key; ``role`` ``delta:<param>`` for whole-parameter deltas."""
    for suffix, role, fmt in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role, fmt
    stem, _, last = key.rpartition(".")
    if stem and last in delta_suffixes:
        return stem, f"delta:{delta_suffixes[last]}", "diff"
    return None


def _groups(tensors: dict[str, torch.Tensor], delta_suffixes: dict[str, str], label: str) -> dict[str, _Group]:
    groups: dict[str, _Group] = {}
    unknown = []
    for key in tensors:
        for suffix, what in _UNSUPPORTED.items():
            if key.endswith(suffix):
                raise WeightsError(f"LoRA {label}: key {key!r} holds {what}, which ditkit does not apply "
                                   f"(supported: low-rank pairs with alpha, diff/diff_b deltas)")
        parsed = _split_key(key, delta_suffixes)
        if parsed is None:
            unknown.append(key)
            continue
        stem, role, fmt = parsed
        group = groups.setdefault(stem, _Group(stem))
        if role in group.keys:
            raise WeightsError(f"LoRA {label}: keys {group.keys[role]!r} and {key!r} both give {role} of {stem!r}")
        group.keys[role] = key
        if fmt:
            group.formats.add(fmt)
    if unknown:
        raise WeightsError(f"LoRA {label}: {len(unknown)} of {len(tensors)} keys are no LoRA weight ditkit knows "
                           f"(lora_A/lora_B, lora_down/lora_up, alpha, diff, diff_b): {_listed(unknown)}")
    return groups


def _listed(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(map(repr, keys[:limit])) + more


# ---------------------------------------------------------------------------------------------
# Routing: file module name -> (component, module path)


def _resolve(fn):
    if fn is None or callable(fn):
        return fn
    module, _, attr = fn.partition(":")
    return getattr(importlib.import_module(module), attr)


class _Component:
    """One declared LoRA component: its modules, flattened names and namings."""

    def __init__(self, name: str, module: nn.Module, key_map):
        self.name, self.module, self.key_map = name, module, key_map
        self.modules = dict(module.named_modules())
        flat: dict[str, str | None] = {}
        for path in self.modules:
            f = path.replace(".", "_")
            flat[f] = None if f in flat and flat[f] != path else path  # None: two modules flatten alike
        self.flat = flat
        self.namings = [(label, _resolve(fn)) for label, fn in key_map.namings.items()]

    def find(self, name: str, fn) -> str | None:
        mapped = fn(name) if fn is not None else name
        if mapped is not None and mapped in self.modules:
            return mapped
        if "." not in name:  # a flattened kohya name: match the component's own names, flattened
            return self.flat.get(name)
        return None

    def layers(self) -> int:
        """Modules a LoRA can patch: those with a matrix or kernel ``weight``."""
        return sum(1 for m in self.modules.values()
                   if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2)


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if name.startswith(w):
                name, changed = name[len(w):], True
    return name


# ---------------------------------------------------------------------------------------------
# Terms: what one adapter adds to one parameter


@dataclass
class _Term:
    coef: float  # alpha / rank for a low-rank pair (alpha / √rank with rsLoRA), 1 for a delta
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    delta: torch.Tensor | None = None

    def value(self, shape: torch.Size, device) -> torch.Tensor:
        """The unscaled update in float32 (``B @ A`` reshaped to the parameter, or ``D``)."""
        if self.delta is not None:
            return self.delta.to(device=device, dtype=torch.float32, copy=True)
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (up @ down).reshape(shape)


@dataclass
class ComponentReport:
    naming: str
    modules: int  # modules patched by a low-rank pair
    layers: int  # modules of the component a LoRA could patch (matrix or kernel weights)
    deltas: int  # whole-parameter deltas
    ranks: list[int]
    alphas: list[float]

    def __str__(self) -> str:
        alphas = ", ".join(f"{a:g}" for a in self.alphas) or "-"
        return (f"{self.modules} of {self.layers} layers (naming {self.naming}, rank {', '.join(map(str, self.ranks)) or '-'}, "
                f"alpha {alphas})" + (f", {self.deltas} whole-parameter deltas" if self.deltas else ""))


@dataclass
class LoraReport:
    """What :meth:`core.Pipeline.load_lora` applied: per component, how many layers it patched out of
    how many, under which naming, with which ranks and alphas; keys skipped with ``strict=False``."""

    adapter: str
    source: str
    scale: float
    formats: list[str]
    components: dict[str, ComponentReport]
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = "; ".join(f"{c}: {r}" for c, r in self.components.items())
        skipped = f"; {len(self.skipped)} keys matched nothing and were skipped: {_listed(self.skipped)}" if self.skipped else ""
        return f"LoRA {self.adapter!r} ({'/'.join(self.formats)}, {self.source}, scale {self.scale:g}): {parts}{skipped}"


@dataclass
class _Adapter:
    name: str
    scale: float
    terms: dict[tuple[str, str, str], list[_Term]]  # (component, module path, parameter) -> terms
    report: LoraReport


def _config_for(config: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The PEFT config fields for a component: ``"<prefix>.<field>"`` entries (diffusers' header)
    win over bare ``"<field>"`` ones (``adapter_config.json``)."""
    out = {k: v for k, v in config.items() if "." not in k}
    p = prefix.rstrip(".")
    out.update({k[len(p) + 1:]: v for k, v in config.items() if p and k.startswith(p + ".")})
    return out


def _peft_alpha(config: dict[str, Any], module_name: str, rank: int) -> float | None:
    """``lora_alpha`` for ``module_name`` from a PEFT config (``alpha_pattern`` as PEFT matches it)."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return float(alpha)
    if config.get("lora_alpha") is not None:
        return float(config["lora_alpha"])
    return None


# ---------------------------------------------------------------------------------------------
# Building an adapter from tensors


def build_adapter(pipe, tensors: dict[str, torch.Tensor], config: dict[str, Any], label: str, *, name: str,
                  scale: float, component: str | None, strict: bool) -> _Adapter:
    spec = pipe.spec
    maps = list(spec.lora) if spec is not None else []
    model = spec.name if spec is not None else type(pipe).__name__
    if not maps:
        raise InputError(f"model {model!r} declares no LoRA support (ModelSpec.lora is empty)")
    by_name = {m.component: m for m in maps}
    if component is not None and component not in by_name:
        raise InputError(f"component {component!r} takes no LoRA in {model!r}; LoRA components: {sorted(by_name)}")
    delta_suffixes = dict(_DELTAS)
    for m in maps:
        delta_suffixes.update(m.delta_suffixes)
    groups = _groups(tensors, delta_suffixes, label)
    if not groups:
        raise WeightsError(f"LoRA {label} holds no LoRA weights")

    # 1. route each group to a component by its prefix
    prefixes = sorted(((p, m.component) for m in maps for p in m.prefixes), key=lambda pc: -len(pc[0]))
    routed: dict[str, list[tuple[_Group, str, str]]] = {}  # component -> (group, name, prefix)
    homeless = []
    for group in groups.values():
        raw, target, prefix = group.raw, None, ""
        for p, comp in prefixes:
            if raw.startswith(p):
                raw, target, prefix = raw[len(p):], comp, p
                break
        raw = _strip_wrappers(raw)
        if component is not None:
            target = component
        elif target is None:
            target = maps[0].component if len(maps) == 1 else None
        if target is None:
            homeless.append(group.raw)
            continue
        routed.setdefault(target, []).append((group, raw, prefix))
    if homeless:
        declared = ", ".join(f"{m.component} ({', '.join(m.prefixes) or 'no prefix'})" for m in maps)
        raise InputError(f"LoRA {label}: {len(homeless)} module names carry no component prefix and {model!r} has "
                         f"several LoRA components ({declared}); pass component= (CLI: --lora COMPONENT=FILE), "
                         f"e.g. for {_listed(homeless, 3)}")

    # 2. per component: the naming that resolves the most names, then the terms
    terms: dict[tuple[str, str, str], list[_Term]] = {}
    reports: dict[str, ComponentReport] = {}
    unmatched: list[str] = []
    for comp_name, items in routed.items():
        module = getattr(pipe, comp_name, None)
        if not isinstance(module, nn.Module):
            raise InputError(f"{model!r} declares LoRA component {comp_name!r}, which the pipeline lacks")
        comp = _Component(comp_name, module, by_name[comp_name])
        scores = [(sum(comp.find(raw, fn) is not None for _, raw, _ in items), i) for i, (_, fn) in enumerate(comp.namings)]
        best = max(scores, key=lambda si: (si[0], -si[1]))[1]
        naming, fn = comp.namings[best]
        ranks, alphas, modules, deltas = set(), set(), 0, 0
        for group, raw, prefix in items:
            path = comp.find(raw, fn)
            if path is None:
                unmatched.extend(group.keys.values())
                continue
            target = comp.modules[path]
            cfg = _config_for(config, prefix)
            for key, term in _terms(group, tensors, target, raw, cfg, label):
                terms.setdefault((comp_name, path, key), []).append(term)
            if "down" in group.keys:
                modules += 1
                rank = tensors[group.keys["down"]].shape[0]
                ranks.add(rank)
                alphas.add(_alpha(group, tensors, raw, cfg, rank))
            deltas += sum(r.startswith("delta:") for r in group.keys)
        reports[comp_name] = ComponentReport(naming, modules, comp.layers(), deltas, sorted(ranks), sorted(alphas))

    if unmatched and (strict or len(unmatched) == len(tensors)):
        where = ", ".join(f"{c} (naming {r.naming}: {r.modules + r.deltas} matched)" for c, r in reports.items())
        raise WeightsError(f"LoRA {label}: {len(unmatched)} of {len(tensors)} keys match no module of {model!r} "
                           f"[{where}]: {_listed(unmatched)}" + ("" if len(unmatched) == len(tensors) else
                           "; load_lora(..., strict=False) skips them"))
    formats = sorted({f for g in groups.values() for f in g.formats}) or ["diff"]
    report = LoraReport(name, label, scale, formats, reports, skipped=sorted(unmatched))
    return _Adapter(name, scale, terms, report)


def _alpha(group: _Group, tensors, raw: str, cfg: dict, rank: int) -> float:
    if "alpha" in group.keys:
        return float(tensors[group.keys["alpha"]].float().item())
    alpha = _peft_alpha(cfg, raw, rank)
    return float(rank) if alpha is None else alpha


def _terms(group: _Group, tensors, module: nn.Module, raw: str, cfg: dict, label: str):
    keys = group.keys
    pair = {"down", "up"} & set(keys)
    if pair and pair != {"down", "up"}:
        have = next(iter(pair))
        raise WeightsError(f"LoRA {label}: {keys[have]!r} has no matching {'up (lora_B/lora_up)' if have == 'down' else 'down (lora_A/lora_down)'} weight")
    if ("alpha" in keys or "up_bias" in keys) and not pair:
        raise WeightsError(f"LoRA {label}: {keys.get('alpha') or keys.get('up_bias')!r} belongs to no lora_A/lora_B pair")
    if cfg.get("use_dora"):
        raise WeightsError(f"LoRA {label} was trained with DoRA (use_dora), which ditkit does not apply")
    if pair:
        weight = getattr(module, "weight", None)
        down, up = tensors[keys["down"]], tensors[keys["up"]]
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            raise WeightsError(f"LoRA {label}: {keys['down']!r} patches {raw!r}, which has no matrix or kernel weight")
        rank = down.shape[0]
        ok = (down.dim() >= 2 and up.dim() >= 2 and up.shape[1] == rank and up.shape[0] == weight.shape[0]
              and all(s == 1 for s in up.shape[2:]) and down[0].numel() == weight[0].numel()
              and (down.dim() == 2 or tuple(down.shape[1:]) == tuple(weight.shape[1:])))
        if not ok:
            raise WeightsError(f"LoRA {label}: {keys['down']!r} {tuple(down.shape)} and {keys['up']!r} {tuple(up.shape)} "
                               f"do not make a delta of {raw!r}'s weight {tuple(weight.shape)}")
        alpha = _alpha(group, tensors, raw, cfg, rank)
        coef = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        yield "weight", _Term(coef, up=up, down=down)
        if "up_bias" in keys:
            yield _delta(module, "bias", tensors[keys["up_bias"]], keys["up_bias"], raw, label, coef)
    for role, key in keys.items():
        if role.startswith("delta:"):
            yield _delta(module, role.split(":", 1)[1], tensors[key], key, raw, label, 1.0)


def _delta(module, param: str, value: torch.Tensor, key: str, raw: str, label: str, coef: float):
    target = getattr(module, param, None)
    if not isinstance(target, torch.Tensor):
        raise WeightsError(f"LoRA {label}: {key!r} is a delta of {raw}.{param}, which does not exist")
    if value.numel() != target.numel():
        raise WeightsError(f"LoRA {label}: {key!r} {tuple(value.shape)} does not fit {raw}.{param} {tuple(target.shape)}")
    return param, _Term(coef, delta=value.reshape(target.shape))


# ---------------------------------------------------------------------------------------------
# The manager


class LoraManager:
    """The adapters of one pipeline and the original values of every parameter they touch."""

    storage: WeightStorage = staticmethod(default_storage)

    def __init__(self, pipe):
        self.pipe = pipe
        self.adapters: dict[str, _Adapter] = {}
        self.originals: dict[tuple[str, str, str], torch.Tensor] = {}  # canonical values, on the host

    # -- parameters ------------------------------------------------------------------------------
    def _module(self, key) -> nn.Module:
        component, path, _ = key
        return getattr(self.pipe, component).get_submodule(path)

    def _refresh(self, keys) -> None:
        """Recompute each parameter from its original and every loaded adapter (load order)."""
        if self.pipe.offload is not None:  # no compute copy outlives the write: each unit reloads from its home
            self.pipe.offload.release_all()
        with torch.no_grad():
            for key in keys:
                module, param = self._module(key), key[2]
                original = self.originals[key]
                active = [(a.scale, t) for a in self.adapters.values() for t in a.terms.get(key, ()) if a.scale != 0]
                for dst in self.storage(module, param):
                    if dst.dtype != original.dtype or dst.shape != original.shape:
                        raise InputError(f"{key[0]}.{key[1]}.{param} changed dtype or shape since its LoRA was loaded "
                                         f"({original.dtype} {tuple(original.shape)} -> {dst.dtype} {tuple(dst.shape)}); "
                                         f"unload_lora() before pipe.to(dtype=...)")
                    if not active:
                        dst.copy_(original)
                        continue
                    w = original.to(device=dst.device, dtype=torch.float32, copy=True)
                    for scale, term in active:
                        w += term.value(w.shape, w.device).mul_(scale * term.coef)
                    dst.copy_(w)

    def _check_ranks(self, keys, what: str) -> None:
        """Under USP every rank must hold the same weights: one all-gather of a checksum."""
        parallel = getattr(self.pipe, "parallel", None)
        if parallel is None or not keys:
            return
        from .parallel.consistency import checksum

        sums = torch.stack([checksum(self.storage(self._module(k), k[2])[0]).cpu() for k in sorted(keys)])
        parallel.check_same(sums, what=what)

    # -- API -------------------------------------------------------------------------------------
    def load(self, source, scale: float = 1.0, adapter_name: str | None = None, *, component: str | None = None,
             strict: bool = True) -> LoraReport:
        scale = _check_scale(scale)
        tensors, config, label = read_lora(source)
        name = adapter_name or (Path(label).stem if label != "<state dict>" else f"lora_{len(self.adapters)}")
        if not isinstance(name, str) or not name:
            raise InputError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        if name in self.adapters:
            raise InputError(f"a LoRA named {name!r} is already loaded; unload_lora({name!r}) first or pass another adapter_name")
        adapter = build_adapter(self.pipe, tensors, config, label, name=name, scale=scale, component=component, strict=strict)
        new = [k for k in adapter.terms if k not in self.originals]
        for key in new:
            self.originals[key] = self.storage(self._module(key), key[2])[0].detach().to("cpu", copy=True)
        self.adapters[name] = adapter
        try:
            self._refresh(adapter.terms)
        except BaseException:
            del self.adapters[name]
            self._refresh(adapter.terms)
            for key in new:
                del self.originals[key]
            raise
        self._check_ranks(adapter.terms, f"weights after load_lora({label!r})")
        if adapter.report.skipped:
            import warnings

            warnings.warn(str(adapter.report), stacklevel=3)
        return adapter.report

    def set_scale(self, adapter_name: str, scale: float) -> None:
        scale = _check_scale(scale)
        adapter = self._get(adapter_name)
        adapter.scale = adapter.report.scale = scale
        self._refresh(adapter.terms)
        self._check_ranks(adapter.terms, f"weights after set_lora_scale({adapter_name!r})")

    def unload(self, adapter_name: str | None = None) -> None:
        if adapter_name is None:
            names = list(self.adapters)
        else:
            self._get(adapter_name)
            names = [adapter_name]
        keys = {k for n in names for k in self.adapters[n].terms}
        for n in names:
            del self.adapters[n]
        self._refresh(keys)
        still = {k for a in self.adapters.values() for k in a.terms}
        for key in keys - still:
            del self.originals[key]

    def _get(self, adapter_name: str) -> _Adapter:
        if adapter_name not in self.adapters:
            raise InputError(f"no LoRA named {adapter_name!r} is loaded; loaded: {sorted(self.adapters) or 'none'}")
        return self.adapters[adapter_name]

    def scales(self) -> dict[str, float]:
        return {n: a.scale for n, a in self.adapters.items()}


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"a LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def lora_manager(pipe) -> LoraManager:
    """The pipeline's :class:`LoraManager`, created on first use."""
    manager = getattr(pipe, "_lora", None)
    if manager is None:
        manager = pipe._lora = LoraManager(pipe)
    return manager


def lora_entries(lora) -> list[tuple[Any, float, str | None]]:
    """``core.load(lora=...)``: a list of ``path``, ``(path, scale)`` or ``(path, scale, component)``
    (a path may also be a state dict) -> ``[(source, scale, component)]``."""
    if isinstance(lora, (str, Path, Mapping)):
        lora = [lora]
    entries = []
    for item in lora:
        if isinstance(item, (str, Path, Mapping)):
            item = (item,)
        if not isinstance(item, (tuple, list)) or not 1 <= len(item) <= 3:
            raise InputError(f"lora= takes a list of (path, scale) or (path, scale, component), got {item!r}")
        source, scale, component = (*item, 1.0, None)[:3] if len(item) == 1 else (*item, None)[:3]
        entries.append((source, _check_scale(scale), component))
    return entries


def load_all(pipe, lora) -> list[LoraReport]:
    """Load every entry of ``core.load(lora=...)`` in order."""
    return [pipe.load_lora(source, scale, component=component) for source, scale, component in lora_entries(lora)]


def check_lora_args(spec, texts) -> None:
    """``ditkit run --lora`` before any work: each file exists and names a LoRA component of the model."""
    components = [m.component for m in spec.lora]
    for text in texts:
        path, _, component = parse_lora_arg(text)
        if not components:
            raise InputError(f"--lora {text}: model {spec.name!r} declares no LoRA support")
        if component is not None and component not in components:
            raise InputError(f"--lora {text}: {component!r} is not a LoRA component of {spec.name!r} ({', '.join(components)})")
        if not Path(path).exists():
            raise InputError(f"--lora {text}: no such file or folder {path}")
