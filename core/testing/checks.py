"""The conformance checks. Each has a readable id, states the operation, its inputs and the
expectation in its failure message, and skips (with the reason) where the model's declared
capabilities rule it out."""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..compile import repeated_block_names
from ..errors import CompileError, GenerationError, InputError, WeightsError
from ..spec import ModelSpec
from .common import (  # noqa: F401  (the kit's shared names, importable from here as before)
    METRIC, PROMPT, CheckFailed, CheckSkipped, KitOptions, compiled_pipeline as _compiled, drawn_sizes, fail,
    graphs as _graphs, rel_error,
)
from .subject import Subject

@dataclass(frozen=True)
class Check:
    id: str
    title: str
    run: Callable[[Subject, "KitOptions"], dict | None]
    """Runs the check; returns what it measured (errors, tolerances, cases) for the report."""
    depends: tuple[str, ...] = ()


# -- 1. spec and presets ------------------------------------------------------------------------
def check_spec_valid(subject: Subject, opts: KitOptions) -> dict:
    """What registration cannot see: every generation argument the spec names (preset defaults,
    the kit's calls, sizes, uneven call, bad inputs) must be one the pipeline knows, and a model that
    runs sequence-parallel must declare a call with uneven lengths. A name the plugin did not write
    (a default of :class:`core.spec.Conformance`) is blamed on the kit's default, not on the plugin."""
    spec = subject.spec
    known = subject.known_arguments()
    named = {f"presets[{p!r}].defaults of {spec.name!r}": set(pr.defaults) for p, pr in spec.presets.items()}
    c = spec.conformance
    for field in ("call", "sizes", "uneven_call"):
        where = (f"conformance.{field} of {spec.name!r}" if field in c.model_fields_set
                 else f"the kit's default conformance.{field} (the plugin declares none)")
        named[where] = set(getattr(c, field) or {})
    for i, bad in enumerate(c.bad_inputs):
        named[f"conformance.bad_inputs[{i}] of {spec.name!r}"] = set(bad)
    for where, keys in named.items():
        unknown = sorted(keys - known)
        if unknown:
            fix = "; declare it with the pipeline's own arguments" if where.startswith("the kit's") else ""
            fail(f"{where} names {unknown}, which the pipeline does not take (it takes {sorted(known)}){fix}")
    if spec.capabilities.usp and c.uneven_call is None and "usp-parity" not in c.expected_failures:
        fail(f"{spec.name!r} runs sequence-parallel but declares no conformance.uneven_call (a call whose split "
             f"sequence leaves a remainder on 2 and 4 ranks); usp-parity would not prove uneven lengths")
    return {"arguments": sorted(known), "checked": sorted(named)}


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


def check_compile_parity(subject: Subject, opts: KitOptions) -> dict:
    _needs_compile(subject)
    eager, compiled = subject.pipe(), _compiled(subject)
    rtol = subject.spec.conformance.compile_rtol
    cases = []
    for sizes in drawn_sizes(subject, opts):
        args = subject.call_args(**sizes)
        ref = eager(PROMPT, **args).tensor()
        got = compiled(PROMPT, **args).tensor()
        cases.append({"sizes": sizes, "error": rel_error(got, ref)})
    details = {"metric": METRIC, "tolerance": rtol, "max_error": max(c["error"] for c in cases), "cases": cases}
    bad = [c for c in cases if not c["error"] <= rtol]
    if bad:
        fail("compiled output should equal eager output within relative error "
             f"{rtol:g}; it differs for " + "; ".join(f"{c['sizes']}: {c['error']:.3g}" for c in bad), details)
    return details


def _three_sizes(subject: Subject) -> list[dict]:
    """The smallest, a middle and the largest declared size."""
    ranges = subject.spec.conformance.sizes.items()
    return [{k: pick(r.values()) for k, r in ranges} for pick in (lambda v: v[0], lambda v: v[len(v) // 2], lambda v: v[-1])]


def check_no_recompile(subject: Subject, opts: KitOptions) -> dict:
    """Graphs are counted from the very first call: each compiled block class (shared by all its
    instances) and each compiled method must hold exactly one graph after it, so a block whose
    second instance recompiles during the first call fails here; no later call (the compile-parity
    sizes, steps, guidance on/off, prompt lengths, three sizes) may add one."""
    _needs_compile(subject)
    pipe = _compiled(subject)
    first = subject._pipes["first_call_graphs"]
    details = {"graphs_after_first_call": first, "cases": []}
    several = {k: n for k, n in first.items() if n > 1}
    if several:
        fail(f"after the first call every compiled region should hold one graph (one per block class, shared by "
             f"every instance); recompiled during the first call: {several}", details)
    steps = subject.argument("num_inference_steps")  # the pipeline's own names, never one it does not take
    more = {} if steps is None else {"num_inference_steps": max(2, subject.call_args().get(steps) or 2)}
    base = subject.call_args(**more)
    cfg_values = [1.0, 3.0] if subject.spec.capabilities.cfg else [base.get(subject.argument("guidance_scale"), 1.0)]
    prompts = [PROMPT, "a red fox"]  # two prompt lengths (token counts differ)
    cases = [({}, g, p) for g in cfg_values for p in prompts] + [(s, g, PROMPT) for s in _three_sizes(subject) for g in cfg_values]
    with torch.compiler.set_stance("fail_on_recompile"):
        for sizes, scale, prompt in cases:
            details["cases"].append({"sizes": sizes, "guidance_scale": scale, "prompt_chars": len(prompt)})
            try:
                pipe(prompt, **subject.call_args(**more, **sizes, guidance_scale=scale))
            except RuntimeError as exc:
                if "recompile" not in str(exc):
                    raise
                fail(f"with dynamic=True, generating at {sizes or 'the default size'} with guidance {scale} "
                     f"(prompt of {len(prompt)} characters) after the first call should not recompile: "
                     f"{str(exc).splitlines()[-1].strip()}", details)
    details["graphs_after_all_calls"] = now = _graphs(pipe)
    grown = {k: (first.get(k, 0), n) for k, n in now.items() if n > max(1, first.get(k, 0))}
    if grown:
        fail(f"calls after the first (compile-parity sizes included) should compile nothing; graphs grew "
             f"(first call -> now): {grown}", details)
    return details


# -- 6. USP ---------------------------------------------------------------------------------------
def check_usp_parity(subject: Subject, opts: KitOptions) -> dict:
    if not subject.spec.capabilities.usp:
        raise CheckSkipped("the model declares no USP adapter (capabilities.usp is False)")
    from .usp import usp_parity

    return usp_parity(subject, opts)


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
    caps = subject.spec.capabilities
    if caps.cfg and caps.negative_prompt:
        # the declared negative-prompt support must reach the model: another negative prompt under
        # guidance changes the output
        base = subject.call_args(seed=11, guidance_scale=3.0)
        d = pipe(PROMPT, **base, negative_prompt="blurry, low quality").tensor()
        e = pipe(PROMPT, **base, negative_prompt="a bright sunny beach").tensor()
        if torch.equal(d, e):
            fail("capabilities.negative_prompt is True, but two different negative prompts at guidance 3.0 "
                 "gave identical output")


_RANGES = {"image": (0.0, 1.0), "video": (0.0, 1.0), "video+audio": (0.0, 1.0), "audio": (-1.0, 1.0)}
_DIMS = {"image": 4, "video": 5, "video+audio": 5, "audio": 3}


def check_end_to_end(subject: Subject, opts: KitOptions) -> dict:
    """At one step (the shortest schedule: σ from 1 straight to 0) and at the tiny preset's default
    step count, each output must be finite and of the declared kind, shape, dtype and range."""
    pipe = subject.pipe()
    default = pipe.resolve()["num_inference_steps"]
    seconds = {}
    for steps in sorted({1, default}):
        start = time.perf_counter()
        try:
            out = pipe(PROMPT, **subject.call_args(num_inference_steps=steps))
        except GenerationError as exc:  # the core's guard: a non-finite latent or output
            fail(f"generating at num_inference_steps={steps} should give finite output: {exc}")
        _end_to_end(subject, out, steps)
        seconds[str(steps)] = round(time.perf_counter() - start, 3)
    return {"num_inference_steps": sorted({1, default}), "seconds": seconds}


def _end_to_end(subject: Subject, out, steps: int) -> None:
    spec = subject.spec
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
        fail(f"{kind} output at num_inference_steps={steps} should be finite and within [{lo}, {hi}], got "
             f"[{x.min().item():.3g}, {x.max().item():.3g}]")
    if out.kind in ("video", "video+audio") and not out.fps:
        fail("video output should carry its fps")


def check_reference_parity(subject: Subject, opts: KitOptions) -> dict:
    from .reference import reference_parity  # its own module (imports this one)

    return reference_parity(subject, opts)


def check_bad_input(subject: Subject, opts: KitOptions) -> None:
    spec = subject.spec
    pipe = subject.pipe()
    multiple = spec.capabilities.size_multiple
    cases = [("an empty prompt", "", {})]
    if subject.argument("num_inference_steps"):  # each case in the pipeline's own argument names (call_args)
        cases += [("a negative step count", PROMPT, {"num_inference_steps": -1}),
                  ("a zero step count", PROMPT, {"num_inference_steps": 0})]
    cases += [(f"a {key} that is not a multiple of {multiple}", PROMPT, {key: multiple * 2 + multiple // 2})
              for key in ("height", "width") if subject.argument(key)]
    if not spec.capabilities.image_input:
        cases.append(("an image for a model without image input", PROMPT, {"image": torch.zeros(3, multiple, multiple)}))
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
    Check("usp-parity", "USP on N gloo ranks (--usp N, default 2) equals one process", check_usp_parity, ("tiny-builds",)),
    Check("determinism", "same seed same output, other seed other output", check_determinism, ("tiny-builds",)),
    Check("end-to-end", "finite output of the declared kind, shape and range, at 1 step and the default steps",
          check_end_to_end, ("tiny-builds",)),
    Check("bad-input", "bad inputs raise InputError", check_bad_input, ("tiny-builds",)),
    Check("lora", "LoRA equals merged weights, exact unload", lambda s, o: _lora("check_lora", s, o), ("tiny-builds",)),
    Check("lora-compile", "LoRA on the compiled pipeline: no recompile, in place", lambda s, o: _lora("check_lora_compile", s, o),
          ("compile-parity",)),
    Check("reference-parity", "equals an independent reference: text, sigmas, first velocity, latents, output",
          check_reference_parity, ("tiny-builds",)),
)


def _lora(name: str, subject: Subject, opts: KitOptions):
    from . import lora  # the LoRA checks live in their own file (core/testing/lora.py)

    return getattr(lora, name)(subject, opts)
CHECK_IDS = tuple(c.id for c in CHECKS)
