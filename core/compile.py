"""Regional, whole-model and method compilation of pipeline components.

For each block class a component repeats, the class's ``forward`` is compiled *once* and bound to
every instance, so all instances share one dynamo code object and one graph (``nn.Module.compile``
would compile ``Module._call_impl``, a code object shared by every module class, so a second block
class would count as a recompilation of the first). Module hooks (USP splits) stay outside the
compiled region. Components without repeated blocks get their called methods compiled whole:
``forward`` and, where declared, methods such as a VAE's ``decode`` / ``encode``.
"""
from __future__ import annotations

import types
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
from torch import nn

from .compile_cache import persistent_cache_dir
from .errors import CompileError

__all__ = ["CompiledPart", "CompileReport", "compile_components", "graphs_compiled", "repeated_block_names", "standalone"]

_MARK = "_ditkit_compiled_methods"


@dataclass(frozen=True)
class CompiledPart:
    component: str
    how: str  # "regional" | "whole" | "method"
    target: str  # block class name, or "ClassName.method"
    instances: int
    code: types.CodeType | None = field(default=None, compare=False, repr=False)
    """The compiled function's code object (dynamo keys its cache of graphs by it)."""


@dataclass
class CompileReport:
    """What :meth:`Pipeline.compile_pipeline` compiled, and how."""

    parts: list[CompiledPart] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    cache_dir: str | None = None
    """Where compiled kernels are cached across processes (see :func:`persistent_cache_dir`)."""
    bundle_loaded: str | None = None
    """The portable compile-cache bundle loaded before compiling, if any (``compile_pipeline(cache_dir=)``)."""
    bundle_unreadable: str | None = None
    """A bundle found for this key but unreadable (empty, truncated, not a bundle): ignored, rewritten on save."""

    def components(self) -> list[str]:
        return sorted({p.component for p in self.parts})

    def to_dict(self) -> dict:
        return {"options": self.options, "cache_dir": self.cache_dir, "bundle_loaded": self.bundle_loaded,
                "bundle_unreadable": self.bundle_unreadable,
                "parts": [{k: v for k, v in asdict(p).items() if k != "code"} for p in self.parts]}

    def graphs(self) -> dict[str, int]:
        """``{"component:target": graphs dynamo holds for it}`` (see :func:`graphs_compiled`)."""
        return {f"{p.component}:{p.target}": graphs_compiled(p) for p in self.parts}

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        rows = [("component", "how", "compiled", "instances sharing one graph")]
        rows += [(p.component, p.how, p.target, str(p.instances)) for p in self.parts]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"compile_pipeline({opts})"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)


def repeated_block_names(module: nn.Module, declared: Iterable[str] = ()) -> list[str]:
    """Declared block class names plus the model class's ``_repeated_blocks`` attribute."""
    own = getattr(type(module), "_repeated_blocks", None) or ()
    return list(dict.fromkeys([*declared, *own]))


def _compiled_function(cache: dict, cls: type, method: str, options: dict):
    key = (cls, method)
    if key not in cache:
        compiled = torch.compile(getattr(cls, method), **options)
        if options.get("dynamic"):
            compiled = _dynamic_shape_config(method)(compiled)
        cache[key] = compiled
    return cache[key]


def _dynamic_shape_config(method: str):
    """Symbolic-shape settings applied only while our regions compile.

    Duck sizing is off everywhere: it ties dims of equal value (64 image tokens and a hidden size
    of 64) into one symbol or a static size, so the next resolution recompiles. For methods other
    than ``forward`` (a VAE's ``decode``/``encode``: convolutions over the resolution) reasoning is
    also size-oblivious, because on CPU the convolution backend (oneDNN or native) is chosen by
    input size and would guard on the resolution. Blocks keep normal reasoning: size-oblivious
    shapes cannot broadcast a size-1 input dim (a timestep shared by all tokens).
    """
    from torch.fx.experimental import _config as fx_config

    if method == "forward":
        return fx_config.patch(use_duck_shape=False)
    return fx_config.patch(use_duck_shape=False, backed_size_oblivious=True)


def standalone(t):
    """``t`` itself if it owns densely strided storage, else a copy that does (tuples element-wise).

    dynamo guards a view's base and a tensor's strides (even a size-1 dim's), so a block class
    whose first instance gets a view (a Linear's 3-d output, a ``[text, image]`` slice) and later
    instances fresh tensors would compile a second graph for the same class."""
    if isinstance(t, tuple):
        return tuple(standalone(x) for x in t)
    if not isinstance(t, torch.Tensor):
        return t
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.insert(0, step)
        step *= size
    if t._base is None and list(t.stride()) == expected:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _standalone_inputs(block, args, kwargs):
    return tuple(standalone(a) for a in args), {k: standalone(v) for k, v in kwargs.items()}


_STANDALONE_MARK = "_ditkit_standalone_hook"


def _hand_standalone_inputs(block: nn.Module) -> None:
    """Every instance of a regionally compiled block class receives inputs that are not views, so
    the class holds one graph from the first call whatever the model code before block 0 does (a
    plugin with its own attention processor included). The hook runs outside the compiled region."""
    if block.__dict__.get(_STANDALONE_MARK):
        return
    block.register_forward_pre_hook(_standalone_inputs, with_kwargs=True)
    block.__dict__[_STANDALONE_MARK] = True


def _bind(module: nn.Module, method: str, compiled) -> None:
    done = module.__dict__.setdefault(_MARK, set())
    if method in done:
        return
    setattr(module, method, types.MethodType(compiled, module))
    done.add(method)


def _declared_class(m: nn.Module) -> type:
    """``m``'s own class: FSDP2's ``fully_shard`` (sharded weights) swaps in a subclass
    ``FSDP<Name>``, which must still match the declared block name and share its graph."""
    import sys

    cls = type(m)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and issubclass(cls, fsdp.FSDPModule):
        return next(c for c in cls.__mro__[1:] if not issubclass(c, fsdp.FSDPModule))
    return cls


def _block_classes(name: str, module: nn.Module, cls_name: str) -> tuple[type, list[nn.Module]]:
    """The one class named ``cls_name`` inside ``module`` and its instances.

    Matching is by class *object*: two distinct classes that share a name (``Block`` in two
    files) must never share a compiled ``forward``, so a name that resolves to two classes is an
    error listing where each lives.
    """
    by_class: dict[type, list[str]] = {}
    for path, m in module.named_modules():
        if _declared_class(m).__name__ == cls_name:
            by_class.setdefault(_declared_class(m), []).append(path or "<root>")
    if not by_class:
        present = sorted({type(m).__name__ for m in module.modules()})
        raise CompileError(
            f"component {name!r} declares repeated block class {cls_name!r}, but no submodule is of "
            f"that class (classes present: {', '.join(present)})"
        )
    if len(by_class) > 1:
        listing = "; ".join(f"{c.__module__}.{c.__qualname__} at {', '.join(paths[:4])}"
                            f"{' ...' if len(paths) > 4 else ''}" for c, paths in by_class.items())
        raise CompileError(
            f"component {name!r}: repeated block name {cls_name!r} matches {len(by_class)} distinct classes "
            f"({listing}); they cannot share one compiled forward. Rename one of them."
        )
    (cls,) = by_class
    return cls, [m for m in module.modules() if _declared_class(m) is cls]


def compile_components(
    modules: dict[str, nn.Module],
    *,
    repeated_blocks: dict[str, list[str]],
    methods: dict[str, list[str]],
    options: dict,
) -> CompileReport:
    """Compile ``modules`` (component name -> module) and report what was compiled."""
    report = CompileReport(options=dict(options), cache_dir=persistent_cache_dir())
    cache: dict = {}
    for name, module in modules.items():
        blocks = repeated_block_names(module, repeated_blocks.get(name, ()))
        if blocks:
            for cls_name in blocks:
                cls, instances = _block_classes(name, module, cls_name)
                compiled = _compiled_function(cache, cls, "forward", options)
                for m in instances:
                    _bind(m, "forward", compiled)
                    _hand_standalone_inputs(m)
                report.parts.append(CompiledPart(name, "regional", cls_name, len(instances), _code(cls, "forward")))
            continue
        for method in methods.get(name, ["forward"]):
            if not callable(getattr(module, method, None)):
                raise CompileError(f"component {name!r} ({type(module).__name__}) has no method {method!r} to compile")
            _bind(module, method, _compiled_function(cache, type(module), method, options))
            how = "whole" if method == "forward" else "method"
            report.parts.append(CompiledPart(name, how, f"{type(module).__name__}.{method}", 1, _code(type(module), method)))
    return report


def _code(cls: type, method: str):
    return getattr(getattr(cls, method), "__code__", None)


def graphs_compiled(part: CompiledPart) -> int:
    """How many graphs dynamo holds for ``part``'s code: 1 once it ran, compiled once and never
    recompiled (every instance of a block class shares it); more means recompilation."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(part.code)) if part.code is not None else 0
