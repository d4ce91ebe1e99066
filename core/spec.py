"""What a plugin declares: the typed records its hooks return.

Every record is a pydantic model validated when the registry collects it; an invalid record is a
:class:`core.errors.PluginError` naming the plugin and its distribution.  The records only
*declare*; the core does the work (building, loading weights, compiling, parallelising).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .contract import parse_requirement

REFERENCE_STAGES: tuple[str, ...] = ("text_embeddings", "sigmas", "velocity", "latents", "output")
"""The stages of one generation that an independent reference is compared on, in order (the
conformance kit's ``reference-parity`` ladder names the first that differs):

- ``text_embeddings``: the conditional prompt's embeddings as the denoiser receives them
  (recorded by the plugin with :meth:`Pipeline.trace`);
- ``sigmas``: the noise levels of the schedule, ending at the last target (recorded by
  :meth:`Pipeline.denoise`);
- ``velocity``: the denoiser's conditional output at the first sigma, before guidance (recorded by
  :meth:`Pipeline.denoise`);
- ``latents``: the final latents, before decoding (recorded by :meth:`Pipeline.denoise`; a plugin
  whose latents are a packed concatenation may record its own afterwards, which replaces it);
- ``output``: the decoded output tensor (:meth:`core.Output.tensor`).

The initial noise is recorded too (``noise``, by :meth:`Pipeline.noise`): it is the one input a
reference shares with the plugin, besides the weights."""

__all__ = [
    "ModelSpec",
    "Preset",
    "WeightFile",
    "WeightsLayout",
    "Capabilities",
    "SequenceSplit",
    "SequenceGather",
    "AttentionSite",
    "UspAdapter",
    "AttentionKernelSpec",
    "SizeRange",
    "Conformance",
    "LoraKeyMap",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Preset(_Record):
    """A named configuration of a model.

    ``config`` is passed to the pipeline factory as is. ``random_weights`` presets build with
    seeded random weights (no checkpoint); the others need ``weights=`` pointing at a checkpoint
    directory in the layout of :class:`WeightsLayout`.
    """

    description: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    random_weights: bool = False
    defaults: dict[str, Any] = Field(default_factory=dict)
    """Default generation arguments for this preset (``num_inference_steps``, ``height``, ``width``, ...)."""


class WeightFile(_Record):
    """One checkpoint file (or sharded set) and the pipeline component it fills.

    ``path`` is relative to the weights directory. For ``format="safetensors"`` the file may
    also be sharded: ``<path>.index.json`` (the Hugging Face index) names the shards.
    ``prefix`` selects the keys that start with it (and strips it) when several components share
    one file. ``key_map`` (a callable or ``"module:attr"``) converts checkpoint keys to module keys.
    """

    component: str
    path: str
    format: Literal["safetensors", "torch"] = "safetensors"
    prefix: str = ""
    key_map: Callable[[str], str | None] | str | None = None
    optional: bool = False


class WeightsLayout(_Record):
    """The official checkpoint layout a plugin loads, as files relative to one directory."""

    description: str = ""
    files: list[WeightFile]
    required_paths: list[str] = Field(default_factory=list)
    """Other files or folders that must exist (tokenizer folders, configs)."""


class Capabilities(_Record):
    """What a model supports; the conformance kit skips checks ruled out here, with the reason."""

    output: Literal["image", "video", "audio", "video+audio"] = "image"
    cfg: bool = True
    compile: bool = True
    usp: bool = False
    negative_prompt: bool = True
    image_input: bool = False
    size_multiple: int = 16
    """``height`` and ``width`` must be multiples of this."""
    max_prompt_tokens: int | None = None


# ---------------------------------------------------------------------------------------------
# USP adapter: how a component runs with its token sequences split across ranks.


class SequenceSplit(_Record):
    """Split a tensor along ``dim`` where it enters or leaves a submodule.

    ``module`` is a dotted path inside the component (``""`` is the component itself);
    ``at="input"`` splits the argument ``arg`` (a keyword name or a positional index) before the
    submodule runs, ``at="output"`` splits its output (``arg`` indexes a tuple output, ``None``
    the whole output). All splits of one ``sequence`` share the same token ranges, so rotary tables
    and per-token modulation follow their tokens. A tensor whose ``dim`` has size 1 is left whole
    (one timestep broadcast over all tokens), and a ``None`` or absent optional input is skipped,
    so one adapter serves a model's variants.
    """

    sequence: str = "tokens"
    module: str
    at: Literal["input", "output"] = "input"
    arg: str | int | None = None
    dim: int = 1
    expected_dims: int | None = None
    """Split only a tensor with this many dimensions and leave any other whole (diffusers'
    ``ContextParallelInput.expected_dims``: Wan's timestep is ``(B, L)`` per token for 2.2 TI2V and
    ``(B,)`` for 2.1, where it broadcasts)."""


class SequenceGather(_Record):
    """Gather a split ``sequence`` back to full length at a submodule's ``at`` point."""

    sequence: str = "tokens"
    module: str
    at: Literal["input", "output"] = "output"
    arg: str | int | None = None
    dim: int = 1


class AttentionSite(_Record):
    """How one attention call site (the ``site=`` name models pass to ``core.attention``) runs.

    - ``parallel``: queries, keys and values are all the split ``sequence``; runs through the
      USP engine (Ulysses all-to-all and/or ring).
    - ``local``: queries are split, keys/values are a context every rank holds whole.
    - ``gather_kv``: queries are split; keys/values are the split ``kv_sequence`` of another
      stream, gathered whole before a local attention.
    - ``joint``: ``[text, image]`` concatenated; the image part is the split ``sequence``; the
      text part is replicated on every rank (``joint_text="replicate"``); the call passes
      ``text_len=`` (text first).
    - ``infer``: for models that do not name their call sites (diffusers' processors). The router
      works out per call which of queries and keys/values end in this rank's shard of
      ``sequence``: the ranks compare a fingerprint of them, and the split part is what differs
      between ranks (whole context is the same bytes on every rank). It then runs the call as
      ``parallel``, ``joint`` (the whole part first), ``local`` or ``gather_kv`` (see
      :mod:`core.parallel.router`). Costs one small all-gather per call.

    Site names are per component; towers that share block code but split different sequences
    pass distinct names (``site="audio.self"``).
    """

    strategy: Literal["parallel", "local", "gather_kv", "joint", "infer"]
    sequence: str = "tokens"
    kv_sequence: str | None = None
    joint_text: Literal["replicate"] = "replicate"

    @model_validator(mode="after")
    def _kv_sequence_for_gather(self) -> "AttentionSite":
        if self.strategy == "gather_kv" and not self.kv_sequence:
            raise ValueError("an attention site with strategy 'gather_kv' must name kv_sequence")
        return self


class UspAdapter(_Record):
    """Unified Sequence Parallelism for one pipeline component."""

    component: str
    heads: int | str
    """The attention head count, or the config key that holds it (validated against the Ulysses degree)."""
    splits: list[SequenceSplit]
    gathers: list[SequenceGather]
    sites: dict[str, AttentionSite]
    stays_split: list[str] = Field(default_factory=list)
    """Sequences this component receives already split and returns split, so it declares no gather
    for them: it runs inside other components' sequence-parallel passes (a bridge called between the
    layers of two towers, which gather their own streams). Its splits of these sequences lay its own
    full-length tensors (rotary tables) over the same token ranges as the streams it is given."""

    @model_validator(mode="after")
    def _sequences_consistent(self) -> "UspAdapter":
        split = {s.sequence for s in self.splits}
        if not self.splits:
            raise ValueError("a USP adapter needs at least one split")
        for g in self.gathers:
            if g.sequence not in split:
                raise ValueError(f"gather of sequence {g.sequence!r}, which no split declares (splits: {sorted(split)})")
        unknown = set(self.stays_split) - split
        if unknown:
            raise ValueError(f"stays_split names sequence(s) {sorted(unknown)}, which no split declares")
        missing = split - {g.sequence for g in self.gathers} - set(self.stays_split)
        if missing:
            raise ValueError(f"split sequence(s) {sorted(missing)} are never gathered (nor declared stays_split)")
        for name, site in self.sites.items():
            for seq in (site.sequence, site.kv_sequence):
                if seq is not None and seq not in split:
                    raise ValueError(f"attention site {name!r} uses sequence {seq!r}, which no split declares")
        return self


# ---------------------------------------------------------------------------------------------
# How the conformance kit exercises a model (core.testing, `ditkit check`).


class SizeRange(_Record):
    """Valid values ``offset + multiple·k`` within ``[min, max]`` (e.g. frames: multiple 4, offset 1)."""

    min: int
    max: int
    multiple: int = 16
    offset: int = 0

    @model_validator(mode="after")
    def _non_empty(self) -> "SizeRange":
        if not self.values():
            raise ValueError(f"size range {self!r} holds no valid value")
        return self

    def values(self) -> list[int]:
        return [v for v in range(self.min, self.max + 1) if (v - self.offset) % self.multiple == 0 and v > 0]


class Conformance(_Record):
    """What the conformance kit needs to know to exercise the ``tiny`` preset quickly."""

    call: dict[str, Any] = Field(default_factory=lambda: {"num_inference_steps": 2})
    """Generation arguments for fast checks (added to the prompt and seed)."""
    sizes: dict[str, SizeRange] = Field(
        default_factory=lambda: {"height": SizeRange(min=32, max=80), "width": SizeRange(min=32, max=80)}
    )
    """Sizes the kit may draw (Hypothesis) for the compile and USP checks."""
    compile_rtol: float = 1e-5
    usp_rtol: float = 1e-5
    uneven_call: dict[str, Any] | None = None
    """Generation arguments at which a split sequence's length is odd (the USP check runs them too)."""
    bad_inputs: list[dict[str, Any]] = Field(default_factory=list)
    """Extra generation arguments that must raise ``core.InputError`` (e.g. ``{"num_frames": 6}``)."""
    expected_failures: dict[str, str] = Field(default_factory=dict)
    """Check id -> reason: a known failure, reported as xfail."""
    reference: Callable[..., Any] | str | None = None
    """An independent implementation of the same generation (a callable or ``"module:attr"``), for the
    ``reference-parity`` check: ``reference(pipe, call, noise) -> {stage: tensor}``. ``pipe`` is the
    plugin's tiny pipeline (its weights are the reference's weights), ``call`` the resolved generation
    arguments (``prompt``, ``negative_prompt``, ``seed``, ``num_inference_steps``, ``guidance_scale``,
    sizes, ...), ``noise`` the initial noise the plugin drew. It returns what it computed itself, with
    its own text encoding, schedule, guidance and decoding, for any of the stages of
    :data:`core.pipeline.REFERENCE_STAGES`, in the plugin's layout. A reference that needs a package
    ditkit does not depend on imports it inside and raises ``ModuleNotFoundError`` when it is missing."""
    reference_tolerances: dict[str, float] = Field(default_factory=dict)
    """Stage -> tolerance, replacing the kit's default for that stage of the ``reference-parity``
    ladder (``core.testing.reference.TOLERANCES``: relative error 1e-5 for text embeddings and the
    first velocity, 1e-4 for latents and output, max |Δσ| 1e-6 for the sigmas)."""

    @field_validator("reference_tolerances")
    @classmethod
    def _known_stages(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(REFERENCE_STAGES))
        if unknown:
            raise ValueError(f"reference_tolerances names {unknown}; the stages are {list(REFERENCE_STAGES)}")
        bad = {k: t for k, t in v.items() if not t > 0}
        if bad:
            raise ValueError(f"reference_tolerances must be positive, got {bad}")
        return v


# ---------------------------------------------------------------------------------------------


class LoraKeyMap(_Record):
    """How LoRA files name the modules of one component (docs/lora.md). The core does the math.

    ``prefixes`` are key prefixes that name this component in a file (diffusers saves
    ``transformer.``); keys without one go to the component ``load_lora(component=...)`` names, or
    to the only declared one. ``namings`` maps a naming's label to a function from a module name in
    the file (prefix stripped) to the component's module name (``None``: the same); per file the
    core uses the naming under which the most names resolve. ``delta_suffixes`` adds key suffixes of
    whole-parameter deltas (``{"diff_m": "modulation"}``) to the built-in ``diff`` -> ``weight``,
    ``diff_b`` -> ``bias``."""

    component: str
    prefixes: list[str] = Field(default_factory=list)
    namings: dict[str, Callable[[str], str | None] | str | None] = Field(default_factory=lambda: {"native": None})
    delta_suffixes: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_naming(self) -> "LoraKeyMap":
        if not self.namings:
            raise ValueError(f"LoRA key map of {self.component!r} declares no naming (use {{'native': None}})")
        return self


class ModelSpec(_Record):
    """One model a plugin registers (the ``ditkit_register_models`` hook returns a list of these).

    ``pipeline`` is the factory: ``pipeline(config, *, device, dtype, weights, **options)`` returns a
    :class:`core.pipeline.Pipeline`; ``config`` is the chosen preset's ``config``; ``weights`` is the
    checkpoint directory (``None`` for random-weight presets, then the factory seeds its own init).
    It may be given as ``"module:attr"`` (a :class:`core.lazy.ImportRef`, imported when a model is
    first built), so that declaring the model does not import the pipeline's code.
    """

    name: str
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    pipeline: Callable[..., Any]
    presets: dict[str, Preset]
    default_preset: str = "tiny"
    weights: WeightsLayout | None = None
    compilable_models: list[str] = Field(default_factory=list)
    repeated_blocks: dict[str, list[str]] = Field(default_factory=dict)
    """Component name -> class names of its repeated blocks (merged with ``_repeated_blocks``)."""
    compiled_methods: dict[str, list[str]] = Field(default_factory=dict)
    """Component name -> the methods the pipeline calls on it (default ``["forward"]``)."""
    usp: list[UspAdapter] = Field(default_factory=list)
    capabilities: Capabilities = Field(default_factory=Capabilities)
    conformance: Conformance = Field(default_factory=Conformance)
    lora: list[LoraKeyMap] = Field(default_factory=list)
    """The components a LoRA file may patch and how files name their modules (empty: no LoRA support)."""
    checkpoint_writer: Callable[..., Any] | None = None
    """``writer(pipe, root)`` writes ``pipe``'s weights (and tokenizer files) in the official layout
    under ``root``. Without it the core writes each :class:`WeightFile` from the component's
    ``state_dict()`` (possible when no ``key_map`` is declared)."""
    contract: str | None = None
    """The plugin contract versions this model works with, as a version specifier (``">=1.1,<2"``;
    see ``docs/contract.md``). The registry refuses the model, naming it, this requirement and the
    running :data:`core.CONTRACT_VERSION`, when they do not match. Unset: no requirement."""

    @field_validator("pipeline", mode="before")
    @classmethod
    def _pipeline_ref(cls, v):
        if isinstance(v, str):
            from .lazy import ImportRef

            return ImportRef(v)
        return v

    @field_validator("name")
    @classmethod
    def _name_format(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"model name {v!r} must be lowercase letters, digits, '.', '_' or '-'")
        return v

    @field_validator("contract")
    @classmethod
    def _contract_specifier(cls, v: str | None) -> str | None:
        if v is not None:
            parse_requirement(v)
        return v

    @field_validator("aliases")
    @classmethod
    def _aliases_format(cls, v: list[str]) -> list[str]:
        for a in v:
            if not _NAME.match(a):
                raise ValueError(f"alias {a!r} must be lowercase letters, digits, '.', '_' or '-'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        if "tiny" not in self.presets:
            raise ValueError(f"model {self.name!r} has no 'tiny' preset (mandatory: random weights, CPU-sized)")
        if not self.presets["tiny"].random_weights:
            raise ValueError(f"model {self.name!r}: the 'tiny' preset must use random weights")
        if self.default_preset not in self.presets:
            raise ValueError(f"default_preset {self.default_preset!r} is not one of the presets {sorted(self.presets)}")
        needs_weights = [p for p, pr in self.presets.items() if not pr.random_weights]
        if needs_weights and self.weights is None:
            raise ValueError(f"presets {needs_weights} load weights but the model declares no weights layout")
        components = set(self.compilable_models)
        for field, mapping in (("repeated_blocks", self.repeated_blocks), ("compiled_methods", self.compiled_methods)):
            unknown = set(mapping) - components
            if unknown:
                raise ValueError(f"{field} names {sorted(unknown)}, which are not in compilable_models {sorted(components)}")
        if self.usp and not self.capabilities.usp:
            raise ValueError("USP adapters are declared but capabilities.usp is False")
        if self.capabilities.usp and not self.usp:
            raise ValueError("capabilities.usp is True but no USP adapter is declared")
        lora = [m.component for m in self.lora]
        if len(set(lora)) != len(lora):
            raise ValueError(f"lora declares a component more than once: {lora}")
        return self


class AttentionKernelSpec(_Record):
    """An attention kernel a plugin offers (``ditkit_register_attention_kernels``).

    ``kernel(q, k, v, *, mask, scale)`` takes and returns ``(B, H, L, D)`` tensors, like SDPA.
    """

    name: str
    kernel: Callable[..., Any]
    description: str = ""
