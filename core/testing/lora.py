"""The conformance kit's ``lora`` and ``lora-compile`` checks, for models that declare ``ModelSpec.lora``.

A LoRA is made up for every declared component: a rank-2 pair on every layer with a matrix weight
(alpha ≠ rank, so a dropped ``alpha/rank`` shows) and a bias delta (``diff_b``) on the first layer
with a bias, keyed in the component's first naming under its first prefix. ``lora`` asserts:

* the weights after ``load_lora`` and after ``set_lora_scale`` are, bit for bit, the kit's own merge
  ``cast(W₃₂ + scale·(alpha/rank)·(B₃₂ @ A₃₂))``, and no other parameter changed;
* generating with the adapter equals generating with the kit's merged weights written by hand;
* ``unload_lora()`` restores every parameter bit for bit;
``lora-compile`` (after ``compile-parity``, on its compiled pipeline): loading, re-scaling and unloading compile
  nothing (``fail_on_recompile``, graphs counted before and after) and keep every ``Parameter``
  object and its storage; the compiled output with the adapter equals the same graphs' output on
  the weights merged by hand, and differs from their output without it (compiled against eager is
  the compile-parity check's business).
"""
from __future__ import annotations

import torch
from torch import nn

from .common import METRIC, PROMPT, CheckSkipped, compiled_pipeline as _compiled, fail, graphs as _graphs, rel_error
from .subject import Subject

RANK, ALPHA = 2, 3.0
ADAPTER = "ditkit-check"


def _call(subject: Subject) -> dict:
    """One denoising step, one branch: the weights are what is under test, not the sampler."""
    extra = {"guidance_scale": 1.0} if "guidance_scale" in subject.known_arguments() else {}
    return subject.call_args(num_inference_steps=1, **extra)


def synthetic_lora(pipe, spec, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, plan)``: the file's tensors and, per ``(component, module, param)``, what the
    kit expects added (``("pair", up, down)`` or ``("delta", d)``)."""
    g = torch.Generator().manual_seed(seed)
    sd, plan = {}, {}
    for keymap in spec.lora:
        module = getattr(pipe, keymap.component)
        prefix = keymap.prefixes[0] if keymap.prefixes else ""
        biased = False
        for name, layer in module.named_modules():
            weight = getattr(layer, "weight", None)
            if not name or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
                continue
            scale = weight.float().std().item() or 1.0
            down = torch.randn(RANK, weight.shape[1], generator=g) / weight.shape[1] ** 0.5
            up = torch.randn(weight.shape[0], RANK, generator=g) * 0.3 * scale
            key = f"{prefix}{name}"
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(ALPHA)
            plan[(keymap.component, name, "weight")] = ("pair", up, down)
            bias = getattr(layer, "bias", None)
            if not biased and isinstance(bias, torch.Tensor):
                d = 0.1 * torch.randn(bias.shape, generator=g)
                sd[f"{key}.diff_b"] = d
                plan[(keymap.component, name, "bias")] = ("delta", d)
                biased = True
    return sd, plan


def merged(original: torch.Tensor, entry, scale: float) -> torch.Tensor:
    """The kit's own merge of one parameter (docs/lora.md, math)."""
    if entry[0] == "pair":
        _, up, down = entry
        return (original.float() + (scale * (ALPHA / RANK)) * (up.float() @ down.float())).to(original.dtype)
    return (original.float() + scale * entry[1].float()).to(original.dtype)


def _params(pipe, spec) -> dict[tuple[str, str, str], nn.Parameter]:
    out = {}
    for keymap in spec.lora:
        for full, p in getattr(pipe, keymap.component).named_parameters():
            module, _, param = full.rpartition(".")
            out[(keymap.component, module, param)] = p
    return out


def _check_weights(params, snapshot, plan, scale: float, when: str) -> None:
    for key, p in params.items():
        want = merged(snapshot[key], plan[key], scale) if key in plan else snapshot[key]
        if not torch.equal(p.detach(), want):
            what = "the kit's merge W + scale·(alpha/rank)·B·A" if key in plan else "unchanged"
            fail(f"{when}, {key[0]}.{key[1]}.{key[2]} should be {what} bit for bit; max difference "
                 f"{(p.detach().float() - want.float()).abs().max().item():.3g}")


def _restored(params, snapshot, when: str) -> None:
    changed = [f"{k[0]}.{k[1]}.{k[2]}" for k, p in params.items() if not torch.equal(p.detach(), snapshot[k])]
    if changed:
        fail(f"{when}, every parameter should equal its original bit for bit; {len(changed)} differ: {changed[:5]}")


def check_lora(subject: Subject, opts) -> dict:
    spec = subject.spec
    if not spec.lora:
        raise CheckSkipped("the model declares no LoRA key maps (ModelSpec.lora)")
    pipe = subject.pipe()
    params = _params(pipe, spec)
    snapshot = {k: p.detach().clone() for k, p in params.items()}
    sd, plan = synthetic_lora(pipe, spec)
    call = _call(subject)
    report = pipe.load_lora(sd, scale=0.5, adapter_name=ADAPTER)
    patched = {c: r.modules for c, r in report.components.items()}
    expected = {}
    for component, _, param in plan:
        if param == "weight":
            expected[component] = expected.get(component, 0) + 1
    if patched != expected:
        fail(f"load_lora should patch every layer the kit's file names ({expected}), it reports {patched}")
    _check_weights(params, snapshot, plan, 0.5, "after load_lora(scale=0.5)")
    pipe.set_lora_scale(ADAPTER, 1.5)
    _check_weights(params, snapshot, plan, 1.5, "after set_lora_scale(1.5)")
    got = pipe(PROMPT, **call).tensor()
    pipe.unload_lora()
    _restored(params, snapshot, "after unload_lora()")
    with torch.no_grad():  # the merged reference, written by hand
        for key, entry in plan.items():
            params[key].copy_(merged(snapshot[key], entry, 1.5))
        ref = pipe(PROMPT, **call).tensor()
        for key, p in params.items():
            p.copy_(snapshot[key])
    error = rel_error(got, ref)
    details = {"metric": METRIC, "tolerance": spec.conformance.compile_rtol, "adapter_vs_merged": error,
               "patched": patched, "report": str(report)}
    if not error <= spec.conformance.compile_rtol:
        fail(f"generating with the LoRA should equal generating with the weights merged by hand; relative error "
             f"{error:.3g} > {spec.conformance.compile_rtol:g}", details)
    return details


def check_lora_compile(subject: Subject, opts) -> dict:
    spec = subject.spec
    if not spec.lora:
        raise CheckSkipped("the model declares no LoRA key maps (ModelSpec.lora)")
    if not spec.capabilities.compile or not spec.compilable_models:
        raise CheckSkipped("the model declares no compilable components")
    compiled = _compiled(subject)
    sd, plan = synthetic_lora(compiled, spec)
    call = _call(subject)
    params = _params(compiled, spec)
    snapshot = {k: p.detach().clone() for k, p in params.items()}
    identity = {k: (id(p), p.data_ptr()) for k, p in params.items()}
    before = _graphs(compiled)
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            base = compiled(PROMPT, **call).tensor()
            compiled.load_lora(sd, scale=0.5, adapter_name=ADAPTER)
            compiled.set_lora_scale(ADAPTER, 1.5)
            out = compiled(PROMPT, **call).tensor()
            compiled.unload_lora()
            with torch.no_grad():  # the same graphs on the weights merged by hand
                for key, entry in plan.items():
                    params[key].copy_(merged(snapshot[key], entry, 1.5))
            ref = compiled(PROMPT, **call).tensor()
    except RuntimeError as exc:
        if "recompile" not in str(exc):
            raise
        fail(f"loading a LoRA or changing its scale on a compiled pipeline should not recompile: "
             f"{str(exc).splitlines()[-1].strip()}")
    finally:
        compiled.unload_lora()
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(snapshot[key])
    after = _graphs(compiled)
    moved = sorted(f"{k[0]}.{k[1]}.{k[2]}" for k, p in _params(compiled, spec).items() if identity.get(k) != (id(p), p.data_ptr()))
    if moved:
        fail(f"load_lora should write the weights in place (same Parameter objects, same storage); replaced: {moved[:5]}")
    if after != before:
        fail(f"load_lora / set_lora_scale / unload_lora should compile nothing; graphs before {before}, after {after}")
    rtol = spec.conformance.compile_rtol
    error, effect = rel_error(out, ref), rel_error(out, base)
    details = {"graphs_before": before, "graphs_after": after, "compiled_adapter_vs_merged": error,
               "compiled_adapter_vs_none": effect}
    if not error <= rtol:
        fail(f"the compiled pipeline with the LoRA should equal it with the weights merged by hand; relative error "
             f"{error:.3g} > {rtol:g}", details)
    if not effect > 10 * rtol:
        fail(f"the LoRA should change the compiled pipeline's output (relative change {effect:.3g}): the compiled "
             f"graphs must read the weights load_lora writes", details)
    return details
