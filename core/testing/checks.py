"""The conformance checks. Each has a readable id, states the operation, its inputs and the
expectation in its failure message, and skips (with the reason) where the model's declared
capabilities rule it out."""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..compile import repeated_block_names
from ..errors import CompileError, InputError, WeightsError
from ..spec import ModelSpec
from .subject import Subject

PROMPT = "a lighthouse on a cliff at dusk"


class CheckFailed(AssertionError):
    """A conformance check found the plugin wrong."""


class CheckSkipped(Exception):
    """A check that does not apply to this model (the message says why)."""


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    run: Callable[[Subject, "KitOptions"], None]
    depends: tuple[str, ...] = ()


@dataclass
class KitOptions:
    max_examples: int = 2
    usp_world: int = 2
    timeout: float = 240.0


def fail(message: str) -> None:
    raise CheckFailed(message)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref − mean(ref)‖: relative to the reference's spread, so a constant offset
    (a mid-grey image from a tiny random model) cannot hide a difference."""
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / (ref - ref.mean()).norm().clamp_min(1e-30)).item()


# -- 1. spec and presets ------------------------------------------------------------------------
def check_spec_valid(subject: Subject, opts: KitOptions) -> None:
    spec = subject.spec
    try:
        ModelSpec.model_validate(dict(spec))
    except Exception as exc:  # pydantic ValidationError
        fail(f"re-validating the ModelSpec of {spec.name!r} should succeed, got: {exc}")


def check_presets_resolve(subject: Subject, opts: KitOptions) -> None:
    spec = subject.spec
    for name, preset in spec.presets.items():
        try:
            with torch.device("meta"):
                pipe = spec.pipeline(dict(preset.config), device=torch.device("meta"), dtype=torch.bfloat16, weights=None)
        except Exception as exc:
            fail(f"building preset {name!r} of {spec.name!r} on the meta device should succeed, got {type(exc).__name__}: {exc}")
        missing = [c for c in spec.compilable_models if c not in pipe.components()]
        if missing:
            fail(f"preset {name!r}: compilable_models {missing} should be nn.Module attributes of the pipeline")
        if spec.weights is not None:
            absent = sorted({wf.component for wf in spec.weights.files} - set(pipe.components()))
            if absent:
                fail(f"preset {name!r}: the weights layout names components {absent} the pipeline lacks")


def check_tiny_builds(subject: Subject, opts: KitOptions) -> None:
    pipe = subject.pipe()
    params = sum(p.numel() for m in pipe.components().values() for p in m.parameters())
    if params == 0:
        fail("the tiny preset should build components with parameters on the CPU; it has none")


# -- 2. weights ------------------------------------------------------------------------------
def _write(subject: Subject, pipe, root: Path) -> None:
    from ..weights import write_checkpoint

    spec = subject.spec
    if spec.checkpoint_writer is not None:
        spec.checkpoint_writer(pipe, root)
    else:
        try:
            write_checkpoint(pipe, root, spec.weights)
        except NotImplementedError as exc:
            raise CheckSkipped(str(exc)) from None


def _needs_weights(subject: Subject) -> None:
    if subject.spec.weights is None:
        raise CheckSkipped("the model declares no checkpoint layout")


def check_weights_load(subject: Subject, opts: KitOptions) -> None:
    _needs_weights(subject)
    source = subject.pipe()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write(subject, source, root)
        try:
            loaded = subject.build(weights=root)
        except WeightsError as exc:
            fail(f"loading a tiny checkpoint written in the official layout should succeed, got: {exc}")
    for comp in {wf.component for wf in subject.spec.weights.files}:
        ref = getattr(source, comp).state_dict()
        got = getattr(loaded, comp).state_dict()
        for key, value in ref.items():
            if not torch.equal(got[key].to(value.dtype), value):
                fail(f"after loading, {comp}.{key} should equal the tensor written to the checkpoint")


def _corruptions(root: Path, subject: Subject):
    """Yield (description, mutate(root), words the error must name)."""
    wf = next(w for w in subject.spec.weights.files if not w.optional)
    path = root / wf.path
    index = path.with_name(path.name + ".index.json")
    if wf.format == "torch":
        def read():
            return torch.load(path, map_location="cpu", weights_only=True)

        def write(sd):
            torch.save(sd, path)
        files = [path]
    else:
        from safetensors.torch import load_file, save_file

        target = path
        if not path.is_file() and index.is_file():
            import json

            target = index.parent / sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]

        def read():
            return load_file(str(target))

        def write(sd):
            save_file(sd, str(target))
        files = [target]
    sd = read()
    key = sorted(sd)[0]
    bigger = [k for k in sorted(sd) if sd[k].dim() >= 1]
    shape_key = bigger[0] if bigger else key
    yield "a missing key", lambda: write({k: v for k, v in sd.items() if k != key}), [key]
    wrong = dict(sd)
    wrong[shape_key] = torch.zeros(*[s + 1 for s in sd[shape_key].shape], dtype=sd[shape_key].dtype)
    yield "a wrong shape", lambda: write(wrong), [shape_key]
    yield "a truncated file", lambda: files[0].write_bytes(files[0].read_bytes()[: max(16, files[0].stat().st_size // 3)]), [files[0].name]


def check_weights_corrupt(subject: Subject, opts: KitOptions) -> None:
    _needs_weights(subject)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write(subject, subject.pipe(), root)
        pristine = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
        for what, mutate, named in _corruptions(root, subject):
            mutate()
            try:
                subject.build(weights=root)
            except WeightsError as exc:
                missing = [w for w in named if w not in str(exc)]
                if missing:
                    fail(f"loading a checkpoint with {what} raised WeightsError, but its message should name {missing}: {exc}")
            except Exception as exc:
                fail(f"loading a checkpoint with {what} should raise WeightsError, got {type(exc).__name__}: {exc}")
            else:
                fail(f"loading a checkpoint with {what} (in {named}) should raise WeightsError; it loaded")
            finally:
                for p, data in pristine.items():
                    p.write_bytes(data)


# -- 3. repeated blocks -------------------------------------------------------------------------
def check_repeated_blocks(subject: Subject, opts: KitOptions) -> None:
    spec = subject.spec
    pipe = subject.build()
    components = pipe.components()
    declared_any = False
    for comp in spec.compilable_models:
        for cls_name in repeated_block_names(components[comp], spec.repeated_blocks.get(comp, ())):
            declared_any = True
            count = sum(type(m).__name__ == cls_name for m in components[comp].modules())
            if count == 0:
                present = sorted({type(m).__name__ for m in components[comp].modules()})
                fail(f"repeated block class {cls_name!r} of component {comp!r} should match at least one module; "
                     f"classes present: {present}")
    if not declared_any:
        raise CheckSkipped("no component declares repeated blocks")
    try:
        report = pipe.compile_pipeline()
    except CompileError as exc:
        fail(f"compile_pipeline() should accept the declared blocks, got: {exc}")
    listed = {(p.component, p.target) for p in report.parts if p.how == "regional"}
    for comp in spec.compilable_models:
        for cls_name in repeated_block_names(components[comp], spec.repeated_blocks.get(comp, ())):
            if (comp, cls_name) not in listed:
                fail(f"the compile report should list block {cls_name!r} of {comp!r}; it lists {sorted(listed)}")


# -- 4, 5. compilation ----------------------------------------------------------------------
def _needs_compile(subject: Subject) -> None:
    if not subject.spec.capabilities.compile or not subject.spec.compilable_models:
        raise CheckSkipped("the model declares no compilable components")


def _compiled(subject: Subject):
    if "compiled" not in subject._pipes:
        pipe = subject.build()
        torch._dynamo.reset()
        pipe.compile_pipeline()
        subject._pipes["compiled"] = pipe
    return subject._pipes["compiled"]


def _size_strategy(subject: Subject):
    from hypothesis import strategies as st

    sizes = subject.spec.conformance.sizes
    return st.fixed_dictionaries({k: st.sampled_from(r.values()) for k, r in sizes.items()})


def check_compile_parity(subject: Subject, opts: KitOptions) -> None:
    from hypothesis import HealthCheck, given, settings

    _needs_compile(subject)
    eager, compiled = subject.pipe(), _compiled(subject)
    rtol = subject.spec.conformance.compile_rtol

    @settings(max_examples=opts.max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(_size_strategy(subject))
    def parity(sizes):
        args = subject.call_args(**sizes)
        ref = eager(PROMPT, **args).tensor()
        got = compiled(PROMPT, **args).tensor()
        err = rel_error(got, ref)
        if not err <= rtol:
            fail(f"compiled output should equal eager output within relative error {rtol:g} for {sizes}; got {err:.3g}")

    parity()


def _three_sizes(subject: Subject) -> list[dict]:
    """The smallest, a middle and the largest declared size."""
    ranges = subject.spec.conformance.sizes.items()
    return [{k: pick(r.values()) for k, r in ranges} for pick in (lambda v: v[0], lambda v: v[len(v) // 2], lambda v: v[-1])]


def check_no_recompile(subject: Subject, opts: KitOptions) -> None:
    _needs_compile(subject)
    pipe = _compiled(subject)
    base = subject.call_args(num_inference_steps=max(2, subject.spec.conformance.call.get("num_inference_steps", 2)))
    cfg_values = [1.0, 3.0] if subject.spec.capabilities.cfg else [base.get("guidance_scale", 1.0)]
    pipe(PROMPT, **{**base, "guidance_scale": cfg_values[-1]})  # warm-up compiles
    cases = [({}, g) for g in cfg_values] + [(s, g) for s in _three_sizes(subject) for g in cfg_values]
    with torch.compiler.set_stance("fail_on_recompile"):
        for sizes, scale in cases:
            try:
                pipe(PROMPT, **{**base, **sizes, "guidance_scale": scale})
            except RuntimeError as exc:
                if "recompile" not in str(exc):
                    raise
                fail(f"with dynamic=True, generating at {sizes or 'the default size'} with guidance {scale} after "
                     f"the first call should not recompile: {str(exc).splitlines()[-1].strip()}")


# -- 6. USP ---------------------------------------------------------------------------------------
def check_usp_parity(subject: Subject, opts: KitOptions) -> None:
    if not subject.spec.capabilities.usp:
        raise CheckSkipped("the model declares no USP adapter (capabilities.usp is False)")
    from .usp import usp_parity

    usp_parity(subject, opts)


# -- 7, 8, 9. behaviour -------------------------------------------------------------------------
def check_determinism(subject: Subject, opts: KitOptions) -> None:
    pipe = subject.pipe()
    a = pipe(PROMPT, **subject.call_args(seed=11)).tensor()
    b = pipe(PROMPT, **subject.call_args(seed=11)).tensor()
    c = pipe(PROMPT, **subject.call_args(seed=12)).tensor()
    if not torch.equal(a, b):
        fail(f"two runs with seed 11 should give identical output; max difference {(a - b).abs().max().item():.3g}")
    if torch.equal(a, c):
        fail("seeds 11 and 12 should give different outputs; they are identical")


_RANGES = {"image": (0.0, 1.0), "video": (0.0, 1.0), "video+audio": (0.0, 1.0), "audio": (-1.0, 1.0)}
_DIMS = {"image": 4, "video": 5, "video+audio": 5, "audio": 3}


def check_end_to_end(subject: Subject, opts: KitOptions) -> None:
    spec = subject.spec
    out = subject.pipe()(PROMPT, **subject.call_args())
    kind = spec.capabilities.output
    if out.kind != kind:
        fail(f"the tiny pipeline should return {kind!r} output as declared, got {out.kind!r}")
    x = out.tensor()
    if x.dim() != _DIMS[kind] or x.dtype != torch.float32:
        fail(f"{kind} output should be a {_DIMS[kind]}-d float32 tensor, got {x.dim()}-d {x.dtype}")
    if kind == "video+audio" and (out.audio is None or out.audio.dim() != 3):
        fail("video+audio output should carry a (batch, channels, samples) audio tensor")
    lo, hi = _RANGES[kind]
    if not torch.isfinite(x).all() or x.min() < lo or x.max() > hi:
        fail(f"{kind} output should be finite and within [{lo}, {hi}], got [{x.min().item():.3g}, {x.max().item():.3g}]")
    if out.kind in ("video", "video+audio") and not out.fps:
        fail("video output should carry its fps")


def check_bad_input(subject: Subject, opts: KitOptions) -> None:
    spec = subject.spec
    pipe = subject.pipe()
    multiple = spec.capabilities.size_multiple
    cases = [("an empty prompt", "", {}), ("a negative step count", PROMPT, {"num_inference_steps": -1}),
             ("a zero step count", PROMPT, {"num_inference_steps": 0}),
             (f"a height that is not a multiple of {multiple}", PROMPT, {"height": multiple * 2 + multiple // 2}),
             (f"a width that is not a multiple of {multiple}", PROMPT, {"width": multiple * 2 + multiple // 2})]
    if spec.capabilities.max_prompt_tokens:
        cases.append(("an over-long prompt", "word " * (4 * spec.capabilities.max_prompt_tokens), {}))
    cases += [(f"{extra}", PROMPT, extra) for extra in spec.conformance.bad_inputs]
    for what, prompt, overrides in cases:
        try:
            pipe(prompt, **subject.call_args(**overrides))
        except InputError:
            continue
        except Exception as exc:
            fail(f"generating with {what} should raise core.InputError, got {type(exc).__name__}: {exc}")
        fail(f"generating with {what} should raise core.InputError; it generated")


CHECKS: tuple[Check, ...] = (
    Check("spec-valid", "the ModelSpec is valid", check_spec_valid),
    Check("presets-resolve", "every preset builds (meta device)", check_presets_resolve),
    Check("tiny-builds", "the tiny preset builds on the CPU", check_tiny_builds),
    Check("weights-load", "an official-layout tiny checkpoint loads", check_weights_load, ("tiny-builds",)),
    Check("weights-corrupt", "corrupt checkpoints raise WeightsError naming key/file", check_weights_corrupt, ("weights-load",)),
    Check("repeated-blocks", "declared repeated blocks exist and are compiled", check_repeated_blocks, ("tiny-builds",)),
    Check("compile-parity", "compiled output equals eager", check_compile_parity, ("repeated-blocks",)),
    Check("no-recompile", "no recompilation across steps, CFG, resolutions", check_no_recompile, ("repeated-blocks",)),
    Check("usp-parity", "USP on 2 ranks equals one process", check_usp_parity, ("tiny-builds",)),
    Check("determinism", "same seed same output, other seed other output", check_determinism, ("tiny-builds",)),
    Check("end-to-end", "output kind, shape, dtype and range", check_end_to_end, ("tiny-builds",)),
    Check("bad-input", "bad inputs raise InputError", check_bad_input, ("tiny-builds",)),
)
CHECK_IDS = tuple(c.id for c in CHECKS)
