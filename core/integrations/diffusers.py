"""Run a diffusers transformer unchanged under ditkit: attention routing and a USP adapter from its ``_cp_plan``.

Three lines bring a diffusers DiT (``pip install "ditkit[diffusers]"``)::

    from core.integrations.diffusers import route_attention, usp_from_cp_plan

    route_attention(transformer)                                  # every attention call -> core.attention
    adapter = usp_from_cp_plan(transformer, component="transformer")  # ModelSpec(usp=[adapter])

:func:`route_attention` swaps each attention module's diffusers processor for one that computes
the same thing but calls :func:`core.attention.attention` with a site name, so the USP router and
the selected kernel see every call. Without USP the outputs equal diffusers' own processors (same
projections, norms and rotary code, imported from diffusers; only the attention call differs).

:func:`usp_from_cp_plan` translates the model's ``_cp_plan`` (diffusers' declaration of where
inputs are split and outputs gathered for context parallelism) into a :class:`core.spec.UspAdapter`.
One difference is deliberate: where diffusers splits the text stream too (Flux splits
``encoder_hidden_states`` and ``txt_ids``; Qwen-Image ``encoder_hidden_states``, its mask and the
text rotary table), ditkit keeps the text whole on every rank and declares the attention a
``joint`` site. The router then cuts the text itself so every text token is a key exactly once,
and all-gathers the text output, so the text stream stays the same bytes on every rank. Splitting
text and image separately would put two padded shards into one concatenated attention input,
whose padding one sequence's mask cannot describe; replicating the text keeps the result exact
for any text and image length. The text's own MLP then runs on every rank (text is short).
Every other plan entry maps one to one; an entry that cannot be expressed exactly raises a
:class:`core.errors.ParallelError` naming it, never skipped.

Covered processors (diffusers 0.42): ``FluxAttnProcessor`` (Flux double- and single-stream),
``WanAttnProcessor`` (Wan 2.1/2.2 self, text cross and I2V image cross-attention),
``QwenDoubleStreamAttnProcessor2_0`` (Qwen-Image) and ``JointAttnProcessor2_0`` (SD3 / SD3.5
joint attention and SD3.5's image-only ``attn2``). Any other processor makes :func:`route_attention`
raise, naming the module and the processor class.
"""
from __future__ import annotations

import torch
from torch import nn

import diffusers
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers import transformer_flux, transformer_qwenimage, transformer_wan

from core.attention import attention
from core.errors import ParallelError, PluginError
from core.spec import AttentionSite, SequenceGather, SequenceSplit, UspAdapter

__all__ = [
    "route_attention",
    "usp_from_cp_plan",
    "routed_processor",
    "FluxAttnProcessor",
    "WanAttnProcessor",
    "QwenDoubleStreamAttnProcessor",
    "JointAttnProcessor",
    "TESTED_DIFFUSERS",
]

TESTED_DIFFUSERS = ">=0.42,<0.43"
"""The diffusers releases whose processors these mirror (the ``diffusers`` extra pins the same)."""

_JOINT = AttentionSite(strategy="joint")


class FluxAttnProcessor:
    """diffusers' ``FluxAttnProcessor`` with the attention through ``core.attention`` (site ``"joint"``).

    Double-stream blocks pass the text as ``encoder_hidden_states``; single-stream blocks pass
    ``[text, image]`` already joined, and :func:`route_attention` hooks those blocks to pass the
    text length as ``text_len``."""

    sites = {"joint": _JOINT}
    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, text_len: int | None = None):
        query, key, value, encoder_query, encoder_key, encoder_value = transformer_flux._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
            text_len = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        site_args = {} if text_len is None else {"text_len": text_len}
        out = attention(query, key, value, site="joint", mask=attention_mask, **site_args)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(encoder_out.contiguous())
        return out


class WanAttnProcessor:
    """diffusers' ``WanAttnProcessor``: self-attention at site ``"self"`` (split under USP), text and
    I2V image cross-attention at site ``"cross"`` (the context is whole on every rank)."""

    sites = {"self": AttentionSite(strategy="parallel"), "cross": AttentionSite(strategy="local")}
    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        cross = encoder_hidden_states is not None
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            # diffusers' rule: the text context is the last 512 tokens, the image context comes first
            image_context_length = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]
        query, key, value = transformer_wan._get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)
        out_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = transformer_wan._get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            out_img = attention(query, key_img, value_img, site="cross").flatten(2, 3).type_as(query)
        out = attention(query, key, value, site="cross" if cross else "self", mask=attention_mask)
        out = out.flatten(2, 3).type_as(query)
        if out_img is not None:
            out = out + out_img
        return attn.to_out[1](attn.to_out[0](out))


def _wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # diffusers' Wan rotary (a closure inside its processor, so not importable): interleaved pairs, real-valued
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class QwenDoubleStreamAttnProcessor:
    """diffusers' ``QwenDoubleStreamAttnProcessor2_0`` with ``[text, image]`` attention at site ``"joint"``.

    A text padding mask (``encoder_hidden_states_mask``) becomes an attention mask, as in diffusers;
    under USP the router refuses masks, so Qwen-Image runs sequence-parallel without one."""

    sites = {"joint": _JOINT}
    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("QwenDoubleStreamAttnProcessor does not accept an external attention_mask; "
                             "pass encoder_hidden_states_mask")
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        img_q, img_k, img_v = (p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v))
        txt_q, txt_k, txt_v = (p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                               for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            rope = transformer_qwenimage.apply_rotary_emb_qwen
            img_q, img_k = rope(img_q, img_freqs, use_real=False), rope(img_k, img_freqs, use_real=False)
            txt_q, txt_k = rope(txt_q, txt_freqs, use_real=False), rope(txt_k, txt_freqs, use_real=False)
        joint_q = torch.cat([txt_q, img_q], dim=1)
        out = attention(joint_q, torch.cat([txt_k, img_k], dim=1), torch.cat([txt_v, img_v], dim=1),
                        site="joint", mask=attention_mask, text_len=seq_txt)
        out = out.flatten(2, 3).to(joint_q.dtype)
        img_out = attn.to_out[0](out[:, seq_txt:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(out[:, :seq_txt].contiguous())


class JointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (SD3, SD3.5). diffusers joins ``[image, text]``; ditkit's
    joint sites take the text first, so this joins ``[text, image]`` (attention is the same up to the
    order of the softmax sum) at site ``"joint"``. SD3.5's image-only ``attn2`` is site ``"self"``."""

    sites = {"joint": _JOINT, "self": AttentionSite(strategy="parallel")}

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


# diffusers processor class -> ours (exact classes: a subclass may compute something else)
_PROCESSORS: dict[type, type] = {
    transformer_flux.FluxAttnProcessor: FluxAttnProcessor,
    transformer_wan.WanAttnProcessor: WanAttnProcessor,
    transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0: QwenDoubleStreamAttnProcessor,
    JointAttnProcessor2_0: JointAttnProcessor,
}
_OURS = tuple(_PROCESSORS.values())


def routed_processor(module: nn.Module) -> type | None:
    """The ditkit processor class :func:`route_attention` gives ``module`` (an attention module with a
    ``processor``), the class it already has, or ``None`` for a processor it does not cover."""
    processor = getattr(module, "processor", None)
    if isinstance(processor, _OURS):
        return type(processor)
    return _PROCESSORS.get(type(processor))


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, type | None]]:
    found = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Module) and hasattr(module, "processor") and hasattr(module, "set_processor"):
            found.append((path, module, routed_processor(module)))
    return found


def _uncovered(model: nn.Module, found) -> None:
    missing = [(p, type(m.processor).__name__) for p, m, cls in found if cls is None]
    if missing:
        listed = ", ".join(f"{p} ({c})" for p, c in missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        covered = ", ".join(sorted(c.__name__ for c in _PROCESSORS))
        raise PluginError(
            f"{type(model).__name__}: cannot route attention of {listed} through core.attention; covered diffusers "
            f"processors: {covered} (diffusers {diffusers.__version__}; tested {TESTED_DIFFUSERS})"
        )


def _flux_single_block_text_len(block, args, kwargs):
    # Flux's single-stream block joins [text, image] before its attention, which then no longer
    # knows where the text ends; the joint site needs it (``text_len``), so pass it in the block's
    # joint_attention_kwargs, which the block forwards to the processor.
    text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    if text is None:
        return None
    if len(args) > 4:  # joint_attention_kwargs passed positionally (gradient checkpointing)
        args = (*args[:4], {**(args[4] or {}), "text_len": text.shape[1]}, *args[5:])
    else:
        kwargs["joint_attention_kwargs"] = {**(kwargs.get("joint_attention_kwargs") or {}), "text_len": text.shape[1]}
    return args, kwargs


def route_attention(model: nn.Module) -> dict[str, str]:
    """Route every attention module of the diffusers ``model`` through :func:`core.attention.attention`.

    Swaps each covered diffusers processor for ditkit's equivalent (same outputs without USP) and
    hooks Flux's single-stream blocks to pass their text length (regional compile itself hands
    every repeated block inputs that are not views, :func:`core.compile.standalone`). Idempotent. Raises
    :class:`core.errors.PluginError` naming every attention module whose processor is not covered
    (under USP an unrouted attention would run on split tokens and be silently wrong).
    Returns ``{module path: processor class name}`` of the routed modules.
    """
    found = _attention_modules(model)
    if not found:
        raise PluginError(f"{type(model).__name__} has no diffusers attention modules (nothing with a processor)")
    _uncovered(model, found)
    routed = {}
    for path, module, cls in found:
        if not isinstance(module.processor, cls):
            module.set_processor(cls())
        routed[path] = cls.__name__
    for module in model.modules():
        if getattr(module, "_ditkit_routed", False):
            continue
        if isinstance(module, transformer_flux.FluxSingleTransformerBlock):
            module.register_forward_pre_hook(_flux_single_block_text_len, with_kwargs=True)
        module._ditkit_routed = True
    return routed


# ---------------------------------------------------------------------------------------------
# _cp_plan -> UspAdapter

_TEXT_INPUTS = {"encoder_hidden_states", "encoder_hidden_states_mask", "txt_ids"}
"""Inputs that carry the text stream in diffusers' DiTs (kept whole: see the module docstring)."""
_TEXT_OUTPUTS = {"QwenImageTransformer2DModel": {("pos_embed", 1)}}
"""``(module, output index)`` entries that are the text stream (Qwen-Image's rotary table is (image, text))."""


def _expand(model: nn.Module, path: str, where: str) -> list[str]:
    """diffusers' module paths: dotted, with at most one ``*`` standing for every item of a ModuleList."""
    if path.count("*") > 1:
        raise ParallelError(f"{where}: more than one '*' in a module path cannot be expressed")
    if "*" not in path:
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ParallelError(f"{where}: {type(model).__name__} has no submodule {path!r}") from None
        return [path]
    head, _, tail = path.partition("*")
    head, tail = head.rstrip("."), tail.lstrip(".")
    try:
        items = model.get_submodule(head)
    except AttributeError:
        raise ParallelError(f"{where}: {type(model).__name__} has no submodule {head!r}") from None
    if not isinstance(items, nn.ModuleList):
        raise ParallelError(f"{where}: '*' must follow a ModuleList, but {head!r} is a {type(items).__name__}")
    return [".".join(p for p in (head, str(i), tail) if p) for i in range(len(items))]


def usp_from_cp_plan(model: nn.Module, component: str = "transformer", *, heads: int | None = None) -> UspAdapter:
    """The :class:`core.spec.UspAdapter` for the diffusers ``model`` (an instance; the meta device is
    enough), derived from its ``_cp_plan`` and the sites of the processors :func:`route_attention`
    installs.

    Each ``ContextParallelInput`` becomes a :class:`SequenceSplit` of the one token sequence
    (``split_output`` -> ``at="output"``, ``expected_dims`` kept), each ``ContextParallelOutput`` a
    :class:`SequenceGather`, a ``*`` module path one rule per ModuleList item. Text-stream entries
    (``encoder_hidden_states``, its mask, ``txt_ids``, Qwen-Image's text rotary table) are not
    split: the text stays whole on every rank and meets the image at ``joint`` sites, which is
    exact for any length (module docstring). ``heads`` defaults to the model's
    ``config.num_attention_heads``. Raises :class:`core.errors.ParallelError` naming the entry that cannot
    be expressed exactly, and :class:`core.errors.PluginError` if an attention processor is not covered.
    """
    name = type(model).__name__
    plan = getattr(model, "_cp_plan", None)
    if not plan:
        raise ParallelError(f"{name} declares no _cp_plan, so no USP adapter can be derived from it; "
                            f"write a core.spec.UspAdapter by hand")
    splits: list[SequenceSplit] = []
    gathers: list[SequenceGather] = []
    text_entries: list[str] = []
    text_outputs = _TEXT_OUTPUTS.get(name, set())
    for path, entry in plan.items():
        where = f"{name}._cp_plan[{path!r}]"
        modules = _expand(model, path, where)
        if isinstance(entry, ContextParallelOutput) or (
                isinstance(entry, (list, tuple)) and all(isinstance(e, ContextParallelOutput) or e is None for e in entry)):
            outputs = [(None, entry)] if isinstance(entry, ContextParallelOutput) else list(enumerate(entry))
            for module in modules:
                gathers += [SequenceGather(module=module, at="output", arg=i, dim=e.gather_dim)
                            for i, e in outputs if e is not None]
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
            is_text = (key in _TEXT_INPUTS) if not spec.split_output else ((path, key) in text_outputs)
            if is_text:
                text_entries.append(here)
                continue
            for module in modules:
                splits.append(SequenceSplit(module=module, at="output" if spec.split_output else "input", arg=key,
                                            dim=spec.split_dim, expected_dims=spec.expected_dims))
    found = _attention_modules(model)
    _uncovered(model, found)
    sites: dict[str, AttentionSite] = {}
    for _, _, cls in found:
        sites.update(cls.sites)
    if text_entries and not any(s.strategy == "joint" for s in sites.values()):
        raise ParallelError(f"{', '.join(text_entries)} split the text stream, but no attention site of {name} "
                            f"is a joint site that could keep the text whole instead")
    if heads is None:
        heads = (getattr(model, "config", None) or {}).get("num_attention_heads")
        if not isinstance(heads, int):
            raise ParallelError(f"{name}.config has no integer num_attention_heads; pass heads=")
    try:
        return UspAdapter(component=component, heads=heads, splits=splits, gathers=gathers, sites=sites)
    except ValueError as exc:
        raise ParallelError(f"{name}._cp_plan does not make a valid USP adapter: {exc}") from None


def cp_plan_text_entries(model: nn.Module) -> list[str]:
    """The ``_cp_plan`` entries of ``model`` that :func:`usp_from_cp_plan` keeps whole (the text stream)."""
    name = type(model).__name__
    out = []
    for path, entry in (getattr(model, "_cp_plan", None) or {}).items():
        if isinstance(entry, dict):
            for key, spec in entry.items():
                if isinstance(spec, ContextParallelInput) and (
                        (not spec.split_output and key in _TEXT_INPUTS)
                        or (spec.split_output and (path, key) in _TEXT_OUTPUTS.get(name, set()))):
                    out.append(f"{name}._cp_plan[{path!r}][{key!r}]")
    return out

