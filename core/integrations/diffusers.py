"""Run a diffusers transformer unchanged under ditkit: attention routing and a USP adapter from its ``_cp_plan``.

Three lines bring a diffusers DiT (``pip install "ditkit[diffusers]"``)::

    from core.integrations.diffusers import route_attention, usp_from_cp_plan

    route_attention(transformer)                                  # every attention call -> core.attention
    adapter = usp_from_cp_plan(transformer, component="transformer")  # ModelSpec(usp=[adapter])

**Routing.** diffusers' attention processors compute their projections, norms, masks and rotary
embeddings themselves and hand the attention product to
``diffusers.models.attention_dispatch.dispatch_attention_fn``, which calls the backend the
processor names (``processor._attention_backend``). This module registers a backend named
``"ditkit"`` in diffusers' backend registry and :func:`route_attention` sets it on every
processor of the model, so each product runs through :func:`core.attention.attention` (the
selected kernel; under USP, the router first). Nothing else of the processor changes, so without
USP the outputs equal diffusers' native backend. ``model.set_attention_backend("ditkit")`` works
too (diffusers' own call, which also makes it the process-wide default); :func:`route_attention`
sets the model's processors only. Processors that do not call ``dispatch_attention_fn`` (diffusers
marks those without an ``_attention_backend`` attribute) cannot be routed this way: SD3's
``JointAttnProcessor2_0`` calls PyTorch's SDPA directly, so :class:`JointAttnProcessor` mirrors it
with the attention through ``core.attention``; any other such processor makes
:func:`route_attention` raise, naming the module and the processor class.

**Which site a call is.** The backend cannot tell a self-attention from a cross- or joint
attention, and need not: every call goes to the one site ``"dispatch"``, whose strategy
``infer`` lets the USP router work it out per call (:mod:`core.parallel.infer`). Before the
token sequence is split, every call is local. After, the ranks compare the queries and the
keys: the part that differs between ranks is this rank's shard, the rest is whole on every
rank. Queries and keys that both end in the shard after ``P`` whole tokens run sequence-parallel
(``P = 0``: self-attention) or as a joint ``[text, image]`` attention with ``text_len = P``
(Flux, Flux.2 and Qwen-Image put the text first); split queries with whole keys (text
cross-attention, an audio stream the plan does not split) run locally; whole queries with split
keys (LTX-2's video-to-audio attention) all-gather the keys first; whole ones run locally (a
token refiner before the split, LTX-2's audio self-attention). Lengths alone could not decide:
a whole stream of as many tokens as a shard looks like one.

**The adapter.** :func:`usp_from_cp_plan` translates the model's ``_cp_plan`` (diffusers'
declaration of where inputs are split and outputs gathered for context parallelism) into a
:class:`core.spec.UspAdapter`: each ``ContextParallelInput`` becomes a
:class:`core.spec.SequenceSplit` of the one sequence ``"tokens"`` (at the module's input, or at
its output for ``split_output``: rotary tables), each ``ContextParallelOutput`` a
:class:`core.spec.SequenceGather`, a ``*`` path one rule per ``ModuleList`` item. One difference
is deliberate: where diffusers splits the text stream too (``encoder_hidden_states``, its masks
``encoder_hidden_states_mask`` / ``encoder_attention_mask``, ``txt_ids``, Qwen-Image's text
rotary table), ditkit keeps the text whole on every rank. Joint attention then cuts the text
itself so every text token is a key exactly once and all-gathers the text output, and
cross-attention to a whole text is exact locally, with its padding mask as is. Splitting text and
image separately would put two padded shards into one attention input; whole text is exact for
any text and image length, and costs the text's own MLP on every rank (text is short).
:func:`register_cp_translation` adds what a plan lacks (the translations the bridge ships are
listed in :data:`TRANSLATIONS`, each with its reason). An entry that cannot be expressed exactly
raises :class:`core.errors.ParallelError` naming it, never skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

import diffusers
from diffusers.models import attention_dispatch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_processor import JointAttnProcessor2_0

from core.attention import attention
from core.errors import ParallelError, PluginError
from core.spec import AttentionSite, SequenceGather, SequenceSplit, UspAdapter

__all__ = [
    "route_attention",
    "usp_from_cp_plan",
    "register_cp_translation",
    "CpTranslation",
    "cp_plan_text_entries",
    "TEXT_INPUTS",
    "TRANSLATIONS",
    "JointAttnProcessor",
    "BACKEND",
    "DISPATCH_SITE",
    "TESTED_DIFFUSERS",
]

TESTED_DIFFUSERS = ">=0.42,<0.43"
"""The diffusers releases this bridge is tested with (the ``diffusers`` extra pins the same)."""

BACKEND = "ditkit"
"""The name of ditkit's backend in diffusers' attention-backend registry."""

DISPATCH_SITE = "dispatch"
"""The ``core.attention`` site of every call made through ``dispatch_attention_fn``."""


# ---------------------------------------------------------------------------------------------
# The "ditkit" attention backend


def _ditkit_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                      scale: float | None = None, enable_gqa: bool = False, _parallel_config=None) -> torch.Tensor:
    """diffusers' backend signature, ``(batch, tokens, heads, head_dim)`` in and out, through ``core.attention``."""
    if dropout_p:
        raise ValueError(f"the {BACKEND!r} attention backend is for inference: dropout_p must be 0, got {dropout_p}")
    if is_causal:
        raise ValueError(f"the {BACKEND!r} attention backend does not run causal attention (is_causal=True)")
    if key.shape[2] != query.shape[2]:
        if not enable_gqa or query.shape[2] % key.shape[2]:
            raise ValueError(f"{query.shape[2]} query heads and {key.shape[2]} key heads need enable_gqa=True "
                             f"and a whole multiple")
        repeat = query.shape[2] // key.shape[2]
        key, value = key.repeat_interleave(repeat, dim=2), value.repeat_interleave(repeat, dim=2)
    if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
        attn_mask = attn_mask[:, None, None, :]  # (batch, keys) -> broadcast over heads and queries, as diffusers' native
    return attention(query, key, value, site=DISPATCH_SITE, mask=attn_mask, scale=scale)


def _backend_member():
    """Our member of diffusers' ``AttentionBackendName`` (registered once, with its function).

    diffusers' enum lists its own backends only, and both ``dispatch_attention_fn`` and
    ``set_attention_backend`` accept members of it, so the member is added to the enum's lookups."""
    names = attention_dispatch.AttentionBackendName
    member = names._value2member_map_.get(BACKEND)
    if member is None:
        member = str.__new__(names, BACKEND)
        member._name_, member._value_ = BACKEND.upper(), BACKEND
        names._value2member_map_[BACKEND] = member
        names._member_map_[BACKEND.upper()] = member
        names._member_names_.append(BACKEND.upper())
    if attention_dispatch._AttentionBackendRegistry._backends.get(member) is not _ditkit_attention:
        attention_dispatch._AttentionBackendRegistry.register(member, constraints=[], supports_context_parallel=True)(
            _ditkit_attention)
    return member


# ---------------------------------------------------------------------------------------------
# SD3: a processor that does not call dispatch_attention_fn


class JointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (SD3, SD3.5), which calls SDPA itself rather than
    ``dispatch_attention_fn``. diffusers joins ``[image, text]``; ditkit's joint sites take the text
    first, so this joins ``[text, image]`` (attention is the same up to the order of the softmax sum)
    at site ``"joint"``. SD3.5's image-only ``attn2`` is site ``"self"``."""

    sites = {"joint": AttentionSite(strategy="joint"), "self": AttentionSite(strategy="parallel")}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # diffusers' processor ignores attention_mask too (SD3 attends over every token)
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is None:
            out = attention(query, key, value, site="self")
            out = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
            return attn.to_out[1](attn.to_out[0](out))
        text_len = encoder_hidden_states.shape[1]
        tq, tk, tv = (p(encoder_hidden_states).view(batch, -1, attn.heads, head_dim)
                      for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        out = attention(torch.cat([tq, query], 1), torch.cat([tk, key], 1), torch.cat([tv, value], 1),
                        site="joint", text_len=text_len)
        out = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        encoder_out, out = out[:, :text_len], out[:, text_len:]
        if not attn.context_pre_only:
            encoder_out = attn.to_add_out(encoder_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, encoder_out


_MIRRORED: dict[type, type] = {JointAttnProcessor2_0: JointAttnProcessor}
"""diffusers processors that bypass ``dispatch_attention_fn`` -> ditkit's mirror (exact classes only)."""


# ---------------------------------------------------------------------------------------------
# Routing


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in model.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]


def _how_routed(module: nn.Module) -> str | None:
    """``"dispatch"`` (the processor calls dispatch_attention_fn), a mirror's class name, or None."""
    processor = getattr(module, "processor", None)
    if processor is None:
        return None
    if isinstance(processor, tuple(_MIRRORED.values())):
        return type(processor).__name__
    if type(processor) in _MIRRORED:
        return _MIRRORED[type(processor)].__name__
    if hasattr(processor, "_attention_backend"):  # diffusers' own test for a processor that dispatches
        return DISPATCH_SITE
    return None


def _refuse_uncovered(model: nn.Module, found: list[tuple[str, nn.Module]]) -> None:
    missing = [(p, type(m.processor).__name__) for p, m in found if _how_routed(m) is None]
    if missing:
        listed = ", ".join(f"{p} ({c})" for p, c in missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise PluginError(
            f"{type(model).__name__}: cannot route attention of {listed} through core.attention: the processor "
            f"neither calls diffusers' dispatch_attention_fn (it has no _attention_backend) nor is one ditkit mirrors "
            f"({', '.join(c.__name__ for c in _MIRRORED)}); diffusers {diffusers.__version__}, tested {TESTED_DIFFUSERS}"
        )


def route_attention(model: nn.Module) -> dict[str, str]:
    """Route every attention module of the diffusers ``model`` through :func:`core.attention.attention`.

    Sets ditkit's backend on each processor that calls ``dispatch_attention_fn`` (its masks, joint
    text and rotary embedding stay diffusers' own) and swaps the processors that bypass it for
    ditkit's mirror. Idempotent; call it again after replacing processors. Raises
    :class:`core.errors.PluginError` naming every attention module whose processor is neither
    (under USP an unrouted attention would run on split tokens and be silently wrong).
    Returns ``{module path: "dispatch" or the mirror's class name}``.
    """
    found = _attention_modules(model)
    if not found:
        raise PluginError(f"{type(model).__name__} has no diffusers attention modules (nothing with a processor)")
    _refuse_uncovered(model, found)
    backend = _backend_member()
    routed = {}
    for path, module in found:
        how = _how_routed(module)
        processor = module.processor
        if type(processor) in _MIRRORED:
            module.set_processor(_MIRRORED[type(processor)]())
        elif how == DISPATCH_SITE:
            processor._attention_backend = backend
        routed[path] = how
    return routed


# ---------------------------------------------------------------------------------------------
# _cp_plan -> UspAdapter

TEXT_INPUTS = frozenset({"encoder_hidden_states", "encoder_hidden_states_mask", "encoder_attention_mask", "txt_ids"})
"""Plan inputs that carry the text stream (or its mask or positions) in diffusers' DiTs: kept whole."""


@dataclass(frozen=True)
class CpTranslation:
    """What the bridge adds to a model class's ``_cp_plan`` (see :func:`register_cp_translation`)."""

    reason: str
    """Why the plan alone is not enough (shown in errors and docs)."""
    plan: dict | None = None
    """A plan in diffusers' vocabulary, used instead of the class's ``_cp_plan`` (a class without one)."""
    whole: frozenset[tuple[str, str | int]] = frozenset()
    """``(module path as in the plan, input name or output index)`` entries kept whole on every
    rank, besides :data:`TEXT_INPUTS` (a text rotary table returned next to the image's)."""
    splits: tuple[SequenceSplit, ...] = ()
    """Splits the plan lacks, in ditkit's vocabulary (sequence ``"tokens"``)."""
    refuse: Callable[[nn.Module], str | None] | None = None
    """``refuse(model)`` -> why this configuration cannot run sequence-parallel exactly, or None."""


TRANSLATIONS: dict[type, CpTranslation] = {}
"""Model class -> its :class:`CpTranslation` (the bridge's own and those registered by plugins)."""


def register_cp_translation(model_class: type, *, reason: str, plan: dict | None = None,
                            whole: Iterable[tuple[str, str | int]] = (), splits: Iterable[SequenceSplit] = (),
                            refuse: Callable[[nn.Module], str | None] | None = None) -> CpTranslation:
    """Teach :func:`usp_from_cp_plan` what ``model_class``'s ``_cp_plan`` lacks (or give a plan to a
    class without one). ``reason`` says why, for errors and docs. ``plan`` replaces the class's
    ``_cp_plan`` (diffusers' ``ContextParallelInput`` / ``ContextParallelOutput`` vocabulary);
    ``whole`` names plan entries kept whole on every rank (``(module path, input name or output
    index)``), besides the text inputs the bridge always keeps whole; ``splits`` adds
    :class:`core.spec.SequenceSplit` rules of the sequence ``"tokens"``; ``refuse(model)`` returns why
    an instance cannot run sequence-parallel exactly (a configuration the processors compute
    wrongly on a shard), or ``None``. A later registration for the same class replaces the earlier
    one. Returns the stored :class:`CpTranslation`."""
    if not isinstance(model_class, type):
        raise TypeError(f"register_cp_translation expects a model class, got {model_class!r}")
    translation = CpTranslation(reason=reason, plan=plan, whole=frozenset(whole), splits=tuple(splits), refuse=refuse)
    TRANSLATIONS[model_class] = translation
    return translation


def _translation(model: nn.Module) -> CpTranslation | None:
    for cls in type(model).__mro__:
        if cls in TRANSLATIONS:
            return TRANSLATIONS[cls]
    return None


def _expand(model: nn.Module, path: str, where: str) -> list[str]:
    """diffusers' module paths: dotted, with at most one ``*`` standing for every item of a ModuleList.
    An item index past the end of a ModuleList names a block a smaller configuration does not
    have (plans written out per block for the released size) and expands to nothing."""
    if path.count("*") > 1:
        raise ParallelError(f"{where}: more than one '*' in a module path cannot be expressed")
    head, star, tail = path.partition("*")
    head, tail = head.rstrip("."), tail.lstrip(".")
    parts = head.split(".") if head else []
    module = model
    for i, part in enumerate(parts):
        if isinstance(module, nn.ModuleList) and part.isdigit() and int(part) >= len(module):
            return []
        try:
            module = module.get_submodule(part)
        except AttributeError:
            raise ParallelError(f"{where}: {type(model).__name__} has no submodule {'.'.join(parts[:i + 1])!r}") from None
    if not star:
        return [head]
    if not isinstance(module, nn.ModuleList):
        raise ParallelError(f"{where}: '*' must follow a ModuleList, but {head!r} is a {type(module).__name__}")
    found = []
    for i in range(len(module)):
        item = ".".join(p for p in (head, str(i)) if p)
        if tail:
            try:
                module[i].get_submodule(tail)
            except AttributeError:
                raise ParallelError(f"{where}: {type(model).__name__} has no submodule {item + '.' + tail!r}") from None
        found.append(".".join(p for p in (item, tail) if p))
    return found


def _entries(model: nn.Module, plan: dict):
    """Yield ``(plan path, where, module paths, kind, key, spec)`` for each plan entry; ``kind`` is ``"in"``,
    ``"out"`` (a split output) or ``"gather"``."""
    name = type(model).__name__
    for path, entry in plan.items():
        where = f"{name}._cp_plan[{path!r}]"
        modules = _expand(model, path, where)
        if isinstance(entry, ContextParallelOutput) or (
                isinstance(entry, (list, tuple)) and all(isinstance(e, ContextParallelOutput) or e is None for e in entry)):
            outputs = [(None, entry)] if isinstance(entry, ContextParallelOutput) else list(enumerate(entry))
            for i, e in outputs:
                if e is not None:
                    yield path, where, modules, "gather", i, e
            continue
        if not isinstance(entry, dict):
            raise ParallelError(f"{where} is a {type(entry).__name__}; expected a dict of ContextParallelInput "
                                f"or a ContextParallelOutput")
        for key, spec in entry.items():
            here = f"{where}[{key!r}]"
            if not isinstance(spec, ContextParallelInput):
                raise ParallelError(f"{here} is a {type(spec).__name__}: splitting a list or tuple of tensors "
                                    f"cannot be expressed (one SequenceSplit splits one tensor)")
            if spec.split_output and not isinstance(key, int):
                raise ParallelError(f"{here}: split_output needs an output index, got {key!r}")
            if not spec.split_output and not isinstance(key, str):
                raise ParallelError(f"{here}: an input split needs the argument's name, got {key!r}")
            yield path, here, modules, "out" if spec.split_output else "in", key, spec


def _plan(model: nn.Module, translation: CpTranslation | None) -> dict:
    plan = translation.plan if translation is not None and translation.plan is not None else getattr(model, "_cp_plan", None)
    if not plan:
        raise ParallelError(f"{type(model).__name__} declares no _cp_plan, so no USP adapter can be derived from it; "
                            f"register one (core.integrations.diffusers.register_cp_translation(..., plan=...)) "
                            f"or write a core.spec.UspAdapter by hand")
    return plan


def _kept_whole(path: str, kind: str, key, translation: CpTranslation | None) -> bool:
    if kind == "in" and key in TEXT_INPUTS:
        return True
    return translation is not None and (path, key) in translation.whole


def usp_from_cp_plan(model: nn.Module, component: str = "transformer", *, heads: int | None = None) -> UspAdapter:
    """The :class:`core.spec.UspAdapter` for the diffusers ``model`` (an instance; the meta device is
    enough), from its ``_cp_plan`` and any :func:`register_cp_translation` for its class.

    Each ``ContextParallelInput`` becomes a :class:`SequenceSplit` of the sequence ``"tokens"``
    (``split_output`` -> ``at="output"``, ``expected_dims`` kept), each ``ContextParallelOutput`` a
    :class:`SequenceGather`, a ``*`` path one rule per ModuleList item. Text entries
    (:data:`TEXT_INPUTS` and a translation's ``whole``) are not split: the text stays whole on every
    rank (module docstring). Calls through ``dispatch_attention_fn`` are the site ``"dispatch"``
    (strategy ``infer``); :class:`JointAttnProcessor` brings its own sites. ``heads`` defaults to the
    model's ``config.num_attention_heads``. Raises :class:`core.errors.ParallelError` naming the
    entry that cannot be expressed exactly or the reason a translation refuses the configuration,
    and :class:`core.errors.PluginError` if an attention processor cannot be routed.
    """
    name = type(model).__name__
    translation = _translation(model)
    if translation is not None and translation.refuse is not None:
        reason = translation.refuse(model)
        if reason:
            raise ParallelError(f"{name} cannot run sequence-parallel exactly: {reason}")
    splits: list[SequenceSplit] = []
    gathers: list[SequenceGather] = []
    for path, _, modules, kind, key, spec in _entries(model, _plan(model, translation)):
        if kind == "gather":
            gathers += [SequenceGather(module=m, at="output", arg=key, dim=spec.gather_dim) for m in modules]
        elif not _kept_whole(path, kind, key, translation):
            splits += [SequenceSplit(module=m, at="output" if kind == "out" else "input", arg=key, dim=spec.split_dim,
                                     expected_dims=spec.expected_dims) for m in modules]
    if translation is not None:
        splits += list(translation.splits)
    found = _attention_modules(model)
    _refuse_uncovered(model, found)
    sites: dict[str, AttentionSite] = {}
    for _, module in found:
        how = _how_routed(module)
        if how == DISPATCH_SITE:
            sites[DISPATCH_SITE] = AttentionSite(strategy="infer")
        else:
            sites.update(next(c for c in _MIRRORED.values() if c.__name__ == how).sites)
    if heads is None:
        heads = (getattr(model, "config", None) or {}).get("num_attention_heads")
        if not isinstance(heads, int):
            raise ParallelError(f"{name}.config has no integer num_attention_heads; pass heads=")
    try:
        return UspAdapter(component=component, heads=heads, splits=splits, gathers=gathers, sites=sites)
    except ValueError as exc:
        raise ParallelError(f"{name}._cp_plan does not make a valid USP adapter: {exc}") from None


def cp_plan_text_entries(model: nn.Module) -> list[str]:
    """The plan entries of ``model`` that :func:`usp_from_cp_plan` keeps whole (the text stream)."""
    translation = _translation(model)
    return [where for path, where, _, kind, key, _ in _entries(model, _plan(model, translation))
            if kind != "gather" and _kept_whole(path, kind, key, translation)]


# ---------------------------------------------------------------------------------------------
# What the plans of diffusers 0.42 lack


_PER_TOKEN_TIMESTEP = SequenceSplit(module="", at="input", arg="timestep", dim=1, expected_dims=2)
"""A ``(batch, tokens)`` timestep split with its tokens; a ``(batch,)`` one stays whole (Wan's own plan does this)."""


def _register_shipped() -> None:
    from diffusers.models.transformers import transformer_helios, transformer_ltx, transformer_ltx2, transformer_qwenimage

    register_cp_translation(
        transformer_qwenimage.QwenImageTransformer2DModel, whole={("pos_embed", 1)},
        reason="pos_embed returns the (image, text) rotary tables; the text is kept whole, so is its table")
    register_cp_translation(
        transformer_ltx.LTXVideoTransformer3DModel, splits=[_PER_TOKEN_TIMESTEP],
        reason="the image-to-video pipelines pass a per-token timestep (batch, tokens), which the plan leaves whole")
    register_cp_translation(
        transformer_ltx2.LTX2VideoTransformer3DModel,
        splits=[_PER_TOKEN_TIMESTEP,
                *(SequenceSplit(module="cross_attn_rope", at="output", arg=i, dim=1, expected_dims=3) for i in (0, 1))],
        reason="the plan splits the video rotary table (rope) but not the one of the audio-video attention "
               "(cross_attn_rope), which rotates the split video queries and keys; and the image-to-video "
               "pipelines pass a per-token video timestep (batch, tokens), which the plan leaves whole")
    register_cp_translation(
        transformer_helios.HeliosTransformer3DModel,
        refuse=lambda model: (
            "is_amplify_history=True: HeliosAttnProcessor scales the history keys it finds by counting the tokens it "
            "receives (hidden_states.shape[1] - original_context_length), which is wrong on a shard (diffusers' own "
            "context parallelism has the same limit)"
            if (getattr(model, "config", None) or {}).get("is_amplify_history") else None),
        reason="a processor computes from the number of tokens it receives")


_register_shipped()
_backend_member()  # importing the bridge makes "ditkit" a diffusers attention backend (set_attention_backend)


# ---------------------------------------------------------------------------------------------
# Names of the first bridge, which mirrored four processors; they keep working, deprecated.


def _routed_subclass(name: str, processor_cls: type) -> type:
    return type(name, (processor_cls,), {
        "_attention_backend": _backend_member(),
        "sites": {DISPATCH_SITE: AttentionSite(strategy="infer")},
        "__doc__": f"diffusers' ``{processor_cls.__name__}`` on ditkit's attention backend (deprecated name)."})


def _deprecated_routed_processor(module: nn.Module) -> type | None:
    """The processor class :func:`route_attention` leaves ``module`` with, or ``None`` if it cannot route it."""
    how = _how_routed(module)
    if how is None:
        return None
    return next((c for c in _MIRRORED.values() if c.__name__ == how), type(module.processor))


def _deprecated(name: str):
    from diffusers.models.transformers import transformer_flux, transformer_qwenimage, transformer_wan

    return {
        "FluxAttnProcessor": lambda: _routed_subclass(name, transformer_flux.FluxAttnProcessor),
        "WanAttnProcessor": lambda: _routed_subclass(name, transformer_wan.WanAttnProcessor),
        "QwenDoubleStreamAttnProcessor": lambda: _routed_subclass(
            name, transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0),
        "routed_processor": lambda: _deprecated_routed_processor,
    }.get(name)


_DEPRECATED_NEW_NAMES = {
    "FluxAttnProcessor": "diffusers' FluxAttnProcessor with route_attention(model)",
    "WanAttnProcessor": "diffusers' WanAttnProcessor with route_attention(model)",
    "QwenDoubleStreamAttnProcessor": "diffusers' QwenDoubleStreamAttnProcessor2_0 with route_attention(model)",
    "routed_processor": "the return value of route_attention(model)",
}
_deprecated_cache: dict[str, object] = {}


def __getattr__(name: str):
    make = _deprecated(name)
    if make is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings

    from ..contract import ContractDeprecationWarning

    warnings.warn(f"core.integrations.diffusers.{name} is deprecated since contract 1.1; use "
                  f"{_DEPRECATED_NEW_NAMES[name]}", ContractDeprecationWarning, stacklevel=2)
    if name not in _deprecated_cache:
        _deprecated_cache[name] = make()
    return _deprecated_cache[name]
