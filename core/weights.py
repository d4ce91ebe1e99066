"""Loading official checkpoints into pipeline components.

A plugin declares its checkpoint layout (:class:`core.spec.WeightsLayout`); this module checks a
directory against it and loads it. Every mismatch is a :class:`core.errors.WeightsError` naming
the file, the key and both shapes, raised from the checkpoint headers (safetensors) or the
``.pth`` archive's index (read onto the meta device: no tensor data) before the component's
memory is filled. The bytes then go straight from the files into the component's own tensors
(:mod:`core.weight_reader`: read once, cast once, no memory-mapping).

Tied parameters (one tensor under two names: transformers' ``_tied_weights_keys``, or any two
state-dict entries sharing storage) are satisfied by a file holding either name.
"""
from __future__ import annotations

import contextlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .errors import WeightsError
from .spec import WeightFile, WeightsLayout
from .weight_reader import SAFETENSORS_DTYPES, LoadStats, TensorSource, fill

__all__ = [
    "Checkpoint", "open_checkpoint", "check_layout", "load_component", "no_init_weights",
    "write_checkpoint",
]


@dataclass
class Checkpoint:
    """Tensor names and shapes of one checkpoint file or sharded set, readable lazily."""

    files: list[Path]
    shapes: dict[str, tuple[int, ...]]
    _where: dict[str, Path]
    _torch_sd: dict | None = None
    dtypes: dict[str, object] | None = None
    """key -> dtype (a ``torch.dtype`` for ``.pth``, the safetensors code such as ``"BF16"``)."""
    sources: dict[str, TensorSource] = field(default_factory=dict)
    """key -> where its bytes lie, for every key :mod:`core.weight_reader` can read directly
    (the others, legacy ``.pth`` archives or exotic dtypes, load through torch or safetensors)."""
    _torch_path: Path | None = None
    """A ``.pth`` archive, memory-mapped by :meth:`tensors` on first use (keys the reader has no
    byte range for; ``offload="disk"``, whose blocks live in the mapped file)."""

    def tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self._torch_path is not None and self._torch_sd is None:
            self._torch_sd = _torch_state(self._torch_path, mmap=True)
        if self._torch_sd is not None:
            return {k: self._torch_sd[k] for k in keys}
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._where[k], []).append(k)
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:  # memory-mapped
                for k in names:
                    out[k] = f.get_tensor(k)
        return out


_SAFETENSORS_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "F4"}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own bound on the JSON header


def _read_safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, int]]:
    """Shapes and dtypes from a safetensors header, read as plain bytes (nothing is mapped), with
    every tensor's declared byte range checked against the file's size: a header declaring a
    tensor beyond the file (truncated, or crafted to make the loader map terabytes) is refused
    here, naming the key. Returns shapes, dtype codes and each tensor's absolute byte offset."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(_HEADER_LIMIT, size - 8):
                raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"cannot read safetensors file {path}: {exc} (truncated or not a safetensors file?)") from exc
    data = size - 8 - n
    shapes, dtypes, offsets = {}, {}, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"safetensors file {path}: key {key!r} has a malformed header entry {info!r}") from exc
        if not 0 <= begin <= end <= data:
            raise WeightsError(
                f"safetensors file {path}: key {key!r} declares bytes {begin}..{end} but the file holds {data} bytes of "
                f"data (truncated, or a header that does not match its data)"
            )
        shapes[key], dtypes[key], offsets[key] = shape, dtype, 8 + n + begin
    return shapes, dtypes, offsets


def _safetensors_sources(path: Path, shapes, dtypes, offsets) -> dict[str, TensorSource]:
    return {k: TensorSource(path, offsets[k], SAFETENSORS_DTYPES[dtypes[k]], shapes[k])
            for k in shapes if dtypes[k] in SAFETENSORS_DTYPES}


def _torch_state(path: Path, *, mmap: bool = False, meta: bool = False) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="meta" if meta else "cpu", mmap=mmap, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt archives
        raise WeightsError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc} (truncated or corrupt?)") from exc
    if not isinstance(sd, Mapping):
        raise WeightsError(f"checkpoint {path} holds a {type(sd).__name__}, expected a state dict")
    sd = dict(sd.get("state_dict", sd)) if "state_dict" in sd else dict(sd)
    odd = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if odd:
        raise WeightsError(f"checkpoint {path}: key {odd[0]!r} holds a {type(sd[odd[0]]).__name__}, not a tensor")
    return sd


def _torch_sources(path: Path, sd: dict[str, torch.Tensor]) -> dict[str, TensorSource]:
    """Byte ranges of a zip-format ``.pth`` read on the meta device (torch records each storage's
    offset in the archive); a tensor that is not a contiguous run of its storage has none. A range
    beyond the file (a truncated archive) is refused naming the key."""
    size = path.stat().st_size
    out = {}
    for key, t in sd.items():
        base = getattr(t.untyped_storage(), "_checkpoint_offset", None)
        if base is None or not t.is_contiguous():
            continue
        src = TensorSource(path, base + t.storage_offset() * t.element_size(), t.dtype, tuple(t.shape))
        if src.offset + src.nbytes > size:
            raise WeightsError(f"checkpoint {path}: key {key!r} declares bytes {src.offset}..{src.offset + src.nbytes} "
                               f"but the file holds {size} bytes (truncated?)")
        out[key] = src
    return out


def _is_float_dtype(dtype) -> bool:
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return str(dtype).upper() in _SAFETENSORS_FLOAT


def open_checkpoint(root: Path, wf: WeightFile) -> Checkpoint | None:
    """Open ``wf`` under ``root``: a single file, a sharded set (``<path>.index.json``) or a ``.pth``."""
    path = root / wf.path
    if wf.format == "torch":
        if not path.is_file():
            return _missing(root, wf)
        # on the meta device: names, shapes, dtypes and byte offsets, no tensor data
        meta = _torch_state(path, meta=True)
        sources = _torch_sources(path, meta)
        return Checkpoint([path], {k: tuple(v.shape) for k, v in meta.items()}, {k: path for k in meta},
                          dtypes={k: v.dtype for k, v in meta.items()}, sources=sources,
                          _torch_path=path)  # mapped only if asked: keys without a byte range, disk offload
    index = path.with_name(path.name + ".index.json")
    if path.is_file():
        shapes, dtypes, offsets = _read_safetensors_header(path)
        return Checkpoint([path], shapes, {k: path for k in shapes}, dtypes=dtypes,
                          sources=_safetensors_sources(path, shapes, dtypes, offsets))
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise WeightsError(f"index {index} is not a safetensors index (needs a 'weight_map'): {exc}") from exc
        shapes, where, dtypes, sources = {}, {}, {}, {}
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            shard_path = index.parent / shard
            if not shard_path.is_file():
                raise WeightsError(f"shard {shard_path} named by {index} is missing")
            header, header_dtypes, header_offsets = _read_safetensors_header(shard_path)
            shard_sources = _safetensors_sources(shard_path, header, header_dtypes, header_offsets)
            for key, file in weight_map.items():
                if file == shard:
                    if key not in header:
                        raise WeightsError(f"key {key!r} is listed in {index} for {shard} but that shard does not hold it")
                    shapes[key] = header[key]
                    dtypes[key] = header_dtypes[key]
                    where[key] = shard_path
                    if key in shard_sources:
                        sources[key] = shard_sources[key]
        return Checkpoint([index.parent / s for s in shards], shapes, where, dtypes=dtypes, sources=sources)
    return _missing(root, wf, also=index.name)


def _missing(root: Path, wf: WeightFile, also: str | None = None) -> None:
    if wf.optional:
        return None
    alt = f" (or the sharded index {also})" if also else ""
    raise WeightsError(f"missing checkpoint file {root / wf.path}{alt} for component {wf.component!r}")


def _resolve_key_map(key_map) -> Callable[[str], str | None] | None:
    if key_map is None or callable(key_map):
        return key_map
    module, _, attr = key_map.partition(":")
    return getattr(importlib.import_module(module), attr)


def _mapped_keys(ckpt: Checkpoint, wf: WeightFile) -> dict[str, str]:
    """module key -> checkpoint key."""
    key_map = _resolve_key_map(wf.key_map)
    out: dict[str, str] = {}
    for ck in ckpt.shapes:
        if wf.prefix:
            if not ck.startswith(wf.prefix):
                continue
            mk = ck[len(wf.prefix):]
        else:
            mk = ck
        if key_map is not None:
            mk = key_map(mk)
            if mk is None:
                continue
        out[mk] = ck
    return out


def _expected(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _expected_dtypes(module: nn.Module) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in module.state_dict().items()}


def tied_groups(module: nn.Module) -> list[list[str]]:
    """State-dict keys that name one tensor, in groups of two or more (module order).

    transformers ties T5's ``encoder.embed_tokens.weight`` to ``shared.weight`` (its
    ``_tied_weights_keys``) by making both attributes one ``Parameter``; a model may also share
    storage between two tensors of the same view. Either way ``save_pretrained`` writes one name,
    and any name of a group fills the whole group. Works on the meta device."""
    groups: dict[tuple, list[str]] = {}
    for key, t in module.state_dict(keep_vars=True).items():
        ident = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        groups.setdefault(ident, []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def check_layout(root: Path, wf: WeightFile, module: nn.Module) -> tuple[Checkpoint, dict[str, str]] | None:
    """Compare a checkpoint's keys and shapes with ``module`` (which may live on the meta device).

    Returns the checkpoint and ``{module key: checkpoint key}`` for every key the file fills
    (tied keys the file holds under another name of their group included)."""
    ckpt = open_checkpoint(root, wf)
    if ckpt is None:
        return None
    mapping = _mapped_keys(ckpt, wf)
    expected = _expected(module)
    for group in tied_groups(module):
        present = [k for k in group if k in mapping]
        for k in group:
            if present and k not in mapping:
                mapping[k] = mapping[present[0]]
    where = ", ".join(str(p) for p in ckpt.files[:3]) + (" ..." if len(ckpt.files) > 3 else "")
    missing = sorted(set(expected) - set(mapping))
    unexpected = sorted(set(mapping) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        names = [mapping[k] for k in unexpected]
        problems.append(f"unexpected keys ({len(names)}): {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    want_dtypes = _expected_dtypes(module)
    for mk in sorted(set(expected) & set(mapping)):
        got = ckpt.shapes[mapping[mk]]
        if got != expected[mk]:
            problems.append(f"key {mapping[mk]!r} has shape {list(got)} in the checkpoint, the model expects {list(expected[mk])}")
        # a float weight stored as integers or bools would be cast silently into garbage; another
        # float type (bf16 for fp32) is a cast done once, on the way into the module
        have = (ckpt.dtypes or {}).get(mapping[mk])
        if have is not None and want_dtypes[mk].is_floating_point and not _is_float_dtype(have):
            name = str(have).removeprefix("torch.")
            problems.append(f"key {mapping[mk]!r} in {ckpt._where[mapping[mk]]} has dtype {name}, the model expects a "
                            f"floating dtype ({str(want_dtypes[mk]).removeprefix('torch.')})")
    if problems:
        raise WeightsError(f"checkpoint {where} does not fit component {wf.component!r}: " + "; ".join(problems))
    return ckpt, mapping


def load_component(root: Path, wf: WeightFile, module: nn.Module, checked=None, *,
                   stats: LoadStats | None = None, threads: int | None = None) -> bool:
    """Fill ``module`` from one declared file; returns False when an optional file is absent.

    Every tensor of the module's state dict is written in place, in the module's own dtype and
    on its own device (which may be CUDA, or meta in tests): the file's bytes are read once and
    cast once (:func:`core.weight_reader.fill`; ``stats`` accumulates what it did)."""
    checked = checked or check_layout(root, wf, module)
    if checked is None:
        return False
    ckpt, mapping = checked
    if _has_load_hooks(module):
        return _load_through_state_dict(ckpt, mapping, module, wf, stats)
    targets = module.state_dict(keep_vars=True)
    direct = [(targets[mk], ckpt.sources[ck]) for mk, ck in mapping.items() if ck in ckpt.sources]
    rest = {mk: ck for mk, ck in mapping.items() if ck not in ckpt.sources}
    files = ", ".join(str(p) for p in ckpt.files[:3])
    try:
        fill(direct, threads=threads, stats=stats)
        if rest:  # a legacy .pth archive or an exotic dtype: through torch / safetensors, then copied in
            tensors = ckpt.tensors(sorted(set(rest.values())))
            with torch.no_grad():
                for mk, ck in rest.items():
                    targets[mk].copy_(tensors[ck])
    except (OSError, RuntimeError, ValueError) as exc:  # file changed or truncated since its header was read
        raise WeightsError(f"cannot read checkpoint {files} for component {wf.component!r}: {type(exc).__name__}: {exc}") from exc
    return True


def _has_load_hooks(module: nn.Module) -> bool:
    """A submodule that converts what it loads (a load-state-dict hook, its own
    ``_load_from_state_dict``) must receive its tensors through ``load_state_dict``."""
    return any(m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks
               or type(m)._load_from_state_dict is not nn.Module._load_from_state_dict for m in module.modules())


def _load_through_state_dict(ckpt: Checkpoint, mapping: dict[str, str], module: nn.Module, wf: WeightFile,
                             stats: LoadStats | None) -> bool:
    """The slower path for modules with load hooks: the file's tensors are read into host memory
    in the file's dtype, then ``load_state_dict`` copies (and casts) them in."""
    files = ", ".join(str(p) for p in ckpt.files[:3])
    try:
        read = {ck: torch.empty(ckpt.sources[ck].shape, dtype=ckpt.sources[ck].dtype)
                for ck in set(mapping.values()) if ck in ckpt.sources}
        fill([(read[ck], ckpt.sources[ck]) for ck in read], stats=stats)
        rest = sorted(set(mapping.values()) - set(read))
        read.update(ckpt.tensors(rest) if rest else {})
    except (OSError, RuntimeError, ValueError) as exc:
        raise WeightsError(f"cannot read checkpoint {files} for component {wf.component!r}: {type(exc).__name__}: {exc}") from exc
    with torch.no_grad():
        module.load_state_dict({mk: read[ck] for mk, ck in mapping.items()}, strict=True)
    return True


def component_module(pipe, name: str) -> nn.Module:
    module = getattr(pipe, name, None)
    if not isinstance(module, nn.Module):
        raise WeightsError(f"the weights layout names component {name!r}, but the pipeline has no such nn.Module")
    return module


def check_required_paths(root: Path, layout: WeightsLayout) -> None:
    if not root.is_dir():
        raise WeightsError(f"weights directory {root} does not exist or is not a directory")
    for rel in layout.required_paths:
        is_pattern = any(c in rel for c in "*?[")
        present = any(root.glob(rel)) if is_pattern else (root / rel).exists()
        if not present:
            raise WeightsError(f"missing {root / rel} (required by the checkpoint layout: {layout.description or 'see the plugin'})")


_INIT_FUNCS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)


@contextlib.contextmanager
def no_init_weights() -> Iterator[None]:
    """Skip ``torch.nn.init`` while modules are built whose weights a checkpoint will overwrite.

    Parameters are still allocated (untouched pages cost no memory on CPU), buffers computed in
    ``__init__`` (rotary tables) are still computed.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCS}
    try:
        for name in _INIT_FUNCS:
            setattr(nn.init, name, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


_DEFERRED = "_ditkit_deferred_device"


@contextlib.contextmanager
def deferred_parameters() -> Iterator[None]:
    """Build modules whose parameters take no memory until :func:`materialize_parameters`.

    Every parameter registered inside the block lives on the meta device, remembering the device
    it was meant for; conversions the factory applies (``module.to(device, dtype)``, ``.half()``)
    change its dtype and intended device, not memory. Buffers stay real, so tables computed in
    ``__init__`` (rotary frequencies) keep their values. Only for modules a checkpoint fills
    completely (every parameter is a checkpoint key, which :func:`check_layout` guarantees): a
    factory that builds a model in float32 and casts it to bf16 then costs neither the float32
    copy nor the cast (on a real-size umT5-XXL, about a minute of page faults on the CPU)."""
    register, apply = nn.Module.register_parameter, nn.Module._apply

    def register_parameter(self, name, param):
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            setattr(meta, _DEFERRED, param.device)
            param = meta
        register(self, name, param)

    def _apply(self, fn, *args, **kwargs):
        def deferred_fn(t):
            if t.device.type == "meta" and isinstance(t, nn.Parameter) and hasattr(t, _DEFERRED):
                out = fn(torch.empty(0, dtype=t.dtype, device=getattr(t, _DEFERRED)))
                setattr(t, _DEFERRED, out.device)
                return t.detach().to(dtype=out.dtype)
            return fn(t)
        return apply(self, deferred_fn, *args, **kwargs)

    nn.Module.register_parameter, nn.Module._apply = register_parameter, _apply
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module._apply = register, apply


def materialize_parameters(modules: dict[str, nn.Module]) -> None:
    """Give every deferred parameter (:func:`deferred_parameters`) uninitialised memory on its
    intended device, in its dtype; tied parameters stay one tensor."""
    made: dict[int, nn.Parameter] = {}
    for module in modules.values():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is None or not hasattr(p, _DEFERRED):
                    continue
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=getattr(p, _DEFERRED)),
                                               requires_grad=p.requires_grad)
                sub._parameters[name] = made[id(p)]


def write_checkpoint(pipe, root: Path, layout: WeightsLayout) -> None:
    """Write ``pipe``'s components in ``layout`` under ``root`` (tests and the conformance kit).

    Files shared by several components (``prefix``) are written once with all their keys. A
    ``key_map`` cannot be inverted generically: such a model declares a ``checkpoint_writer``.
    """
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for wf in layout.files:
        if wf.key_map is not None:
            raise NotImplementedError(
                f"{wf.path} declares a key_map; the model must declare a checkpoint_writer to write it"
            )
        state = component_module(pipe, wf.component).state_dict()
        tensors = grouped.setdefault((wf.path, wf.format), {})
        tensors.update({wf.prefix + k: v.detach().contiguous().cpu() for k, v in state.items()})
    for (rel, fmt), tensors in grouped.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "torch":
            torch.save(tensors, path)
        else:
            from safetensors.torch import save_file

            save_file(_untied(tensors), str(path))


def _untied(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
