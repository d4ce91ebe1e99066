"""The base class every plugin pipeline derives from.

A pipeline holds its components (``torch.nn.Module`` attributes such as ``dit``, ``vae``,
``text_encoder``), validates generation arguments, runs the shared flow-matching denoising loop
with classifier-free guidance and a progress bar, and compiles its components on request.
Subclasses implement :meth:`generate`.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .compile import CompileReport, compile_components
from . import contract, guards
from .errors import CompileError, GenerationError, InputError
from .outputs import Output
from .sampler import euler_step, guide, noise
from .spec import REFERENCE_STAGES  # defined beside the records that name it; importable here as before

__all__ = ["Pipeline", "REFERENCE_STAGES"]


Velocity = Callable[[torch.Tensor, torch.Tensor, str, int], torch.Tensor]
"""``velocity(x, sigma, branch, step)``: the model's velocity; ``branch`` is "cond" or "uncond"."""


class Pipeline:
    """Base of every plugin pipeline.

    One source for each setting: what is compilable and the size multiple come from the
    :class:`core.spec.ModelSpec` that ``core.load`` attaches (``self.spec``); ``defaults`` (a class
    attribute) lists every generation argument the pipeline takes with its fallback value, and the
    chosen preset's ``defaults`` override those values (``resolve``).
    """

    defaults: dict[str, Any] = {"num_inference_steps": 20, "guidance_scale": 1.0, "height": 64, "width": 64}

    base_arguments: tuple[str, ...] = ("prompt", "negative_prompt", "seed", "generator")
    """Generation arguments every pipeline takes besides its ``defaults``' keys."""

    offload: Any = None
    """The :class:`core.offload.Offload` that ``core.load(offload=...)`` attached, else ``None`` (a
    class default too, for a pipeline whose ``__init__`` does not reach this one's)."""

    def __init__(self, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.spec = None  # the ModelSpec, attached by core.load
        self.preset_defaults: dict[str, Any] = {}
        self.preset_config: dict[str, Any] | None = None  # the preset's config, attached by core.load
        self._compile_bundle = None  # (path, key) of the portable compile cache, see compile_pipeline
        self.compile_report: CompileReport | None = None
        self.parallel = None  # the USP runtime, attached by core.load(use_usp=True)
        self.offload = None  # the core.offload.Offload, attached by core.load(offload=...)
        self._trace: dict[str, Any] | None = None  # stage -> value while tracing (see tracing())
        self.lossy: str | None = None  # why outputs are not exact (fp8 weight storage), set by core.load
        self.load_stats = None  # what loading weights= read and cast (core.weight_reader.LoadStats)

    # -- components ----------------------------------------------------------------------------
    def components(self) -> dict[str, nn.Module]:
        return {k: v for k, v in vars(self).items() if isinstance(v, nn.Module)}

    def to(self, device=None, dtype=None) -> "Pipeline":
        """Move every component to ``device`` and, when given, cast its floating-point weights to
        ``dtype`` (the pipeline's compute dtype follows)."""
        if self.offload is not None:
            raise InputError(f"{type(self).__name__} is offloaded ({self.offload.mode!r}): its weights move per call; "
                             f"choose the device with core.load(..., device=...) instead of .to()")
        for module in self.components().values():
            module.to(device=device, dtype=dtype)
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    def _compilable(self) -> list[str]:
        if self.spec is None:
            legacy = contract.legacy_attribute(self, "compilable_models", "ModelSpec.compilable_models")
            if legacy is not None:
                return list(legacy)
            raise CompileError(f"{type(self).__name__} has no ModelSpec attached: build it with core.load(), "
                               f"whose spec declares the compilable components")
        return list(self.spec.compilable_models)

    # -- compilation ---------------------------------------------------------------------------
    def compile_pipeline(
        self,
        mode: str | None = "default",
        dynamic: bool | None = True,
        fullgraph: bool = False,
        compile_models: Iterable[str] | None = None,
        cache_dir: str | None = None,
        **kwargs,
    ) -> CompileReport:
        """Compile the pipeline's components with ``torch.compile``.

        By default every component in ``compilable_models``. Components with repeated blocks (declared
        in the spec or a ``_repeated_blocks`` class attribute) are compiled regionally: one graph per
        block class, shared by every instance; others are compiled whole, including the methods the
        pipeline calls on them (a VAE's ``decode``). Extra ``kwargs`` go to ``torch.compile``.
        Returns (and keeps in ``self.compile_report``) what was compiled and how.

        ``cache_dir`` names a folder of portable compile-cache bundles (:mod:`core.compile_cache`):
        the bundle matching this process (torch, triton, device, model, preset, dtype, options,
        parallel layout) is loaded first; :meth:`save_compile_cache` writes it after a warm-up.
        """
        allowed = self._compilable()
        names = list(compile_models) if compile_models is not None else allowed
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise CompileError(
                f"cannot compile {', '.join(map(repr, unknown))}: compilable components are "
                f"{', '.join(map(repr, allowed)) or 'none'}"
            )
        components = self.components()
        absent = [n for n in names if n not in components]
        if absent:
            raise CompileError(f"compilable component(s) {absent} are not nn.Module attributes of {type(self).__name__}")
        options = {"mode": mode, "dynamic": dynamic, "fullgraph": fullgraph, **kwargs}
        if self.offload is not None:
            self.offload.check_compile(options)
        loaded = unreadable = None
        if cache_dir is not None:
            from .compile_cache import open_bundle

            path, key, status = open_bundle(self, cache_dir, options, names)  # unreadable: a warning, ignored
            self._compile_bundle = (path, key)
            loaded, unreadable = (str(path) if status == s else None for s in ("loaded", "unreadable"))
        spec = self.spec
        try:
            report = compile_components(
                {n: components[n] for n in names},
                repeated_blocks=dict(spec.repeated_blocks) if spec is not None else {},
                methods=dict(spec.compiled_methods) if spec is not None else {},
                options=options,
            )
        except CompileError as exc:  # a wrong declaration: say whose
            from .declarations import declared_by

            raise CompileError(f"{declared_by(self)}: {exc}") from None
        report.bundle_loaded, report.bundle_unreadable = loaded, unreadable
        if self.offload is not None:
            self.offload.compiled(report)  # compiled methods run inside the offload wrappers
        self.compile_report = report
        return report

    def save_compile_cache(self):
        """Write the portable compile-cache bundle of ``compile_pipeline(cache_dir=...)``: what this
        process compiled so far, so call it after generating at the sizes you will use. Returns the
        bundle's path (``None`` when nothing was compiled)."""
        if self._compile_bundle is None:
            raise CompileError("save_compile_cache() needs compile_pipeline(cache_dir=...) first")
        from .compile_cache import save_bundle

        return save_bundle(*self._compile_bundle)

    # -- LoRA (core/lora.py, docs/lora.md) -----------------------------------------------------
    def load_lora(self, path_or_state_dict, scale: float = 1.0, adapter_name: str | None = None, *,
                  component: str | None = None, strict: bool = True):
        """Fuse a LoRA (a file, a folder or a state dict; diffusers/PEFT, kohya/ComfyUI or
        DiffSynth-Studio layout) into the weights in place: ``W + scale·(alpha/rank)·B·A``. Several
        adapters add up; ``component`` sends the file to that component (models with two DiTs);
        keys that match no module are an error unless ``strict=False``. Returns a
        :class:`core.lora.LoraReport`."""
        from .lora import lora_manager

        return lora_manager(self).load(path_or_state_dict, scale, adapter_name, component=component, strict=strict)

    def set_lora_scale(self, adapter_name: str, scale: float) -> None:
        """Change a loaded adapter's strength (recomputed from the original weights; no reload, no recompile)."""
        from .lora import lora_manager

        lora_manager(self).set_scale(adapter_name, scale)

    def unload_lora(self, adapter_name: str | None = None) -> None:
        """Remove one adapter, or all; the weights are those of the adapters left, and with none
        left the original weights, bit for bit."""
        from .lora import lora_manager

        lora_manager(self).unload(adapter_name)

    # -- generation ----------------------------------------------------------------------------
    def resolve(self, **kwargs) -> dict[str, Any]:
        """Fill unset (``None``) arguments from the preset's defaults, then the class defaults.
        Contract-1.0 names (``steps``) are taken under their new names (:mod:`core.contract`)."""
        args = contract.Arguments(contract.plugin_defaults(self))
        kwargs = contract.caller_arguments(self, kwargs, stacklevel=3)
        args.update({k: v for k, v in kwargs.items() if v is not None})
        args.update({k: None for k, v in kwargs.items() if v is None and k not in args})
        return args

    def check_inputs(self, args: dict[str, Any]) -> None:
        """Raise :class:`InputError` for arguments that break the model's rules.

        Known arguments are ``prompt``, ``negative_prompt``, ``seed`` and every key of the class and
        preset defaults; anything else is refused by name."""
        args = contract.Arguments(contract.caller_arguments(self, args, stacklevel=2))
        known = contract.known_arguments(self)
        unknown = sorted(set(args) - known)
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5) or [
                    k for k in sorted(known) if name in k.split("_")]
                if close:
                    hints.append(f"{name!r} -> did you mean {close[0]!r}?")
            hint = f" ({'; '.join(hints)})" if hints else ""
            raise InputError(f"unknown argument(s) {unknown} for {type(self).__name__}{hint}; known: {sorted(known)}")
        prompt = args.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"prompt must be a non-empty string, got {prompt!r}")
        neg = args.get("negative_prompt")
        if neg is not None and not isinstance(neg, str):
            raise InputError(f"negative_prompt must be a string, got {type(neg).__name__}")
        # every float argument (the plugin's own too) finite, every tensor/image argument non-empty
        guards.check_finite_args(args)
        steps = args.get("num_inference_steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise InputError(f"num_inference_steps must be a positive integer, got {steps!r}")
        if steps > guards.MAX_INFERENCE_STEPS:
            raise InputError(f"num_inference_steps must be at most {guards.MAX_INFERENCE_STEPS}, got {steps!r}")
        scale = args.get("guidance_scale")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale < 0:
            raise InputError(f"guidance_scale must be a finite number >= 0, got {scale!r}")
        guards.check_seed(args.get("seed"))
        generator = args.get("generator")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        multiple = (self.spec.capabilities.size_multiple if self.spec is not None else
                    contract.legacy_attribute(self, "size_multiple", "Capabilities.size_multiple") or 1)
        for key in ("height", "width"):
            value = args.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple:
                raise InputError(f"{key} must be a positive multiple of {multiple}, got {value!r}")
        # last: the size rules above hold, so the estimate is of a request the model accepts
        estimated = self.estimate_bytes(args)
        if estimated:
            frames = args.get("num_frames")
            what = (f"{args.get('height')}x{args.get('width')}" + (f", {frames} frames" if frames else "")
                    + f" with {type(self).__name__}")
            from .offload import check_fits

            check_fits(self, int(estimated), what)  # plus what the offload mode materialises per call

    def estimate_bytes(self, args: dict[str, Any]) -> int:
        """A lower bound of the peak memory one call with ``args`` takes on ``self.device``,
        checked against the free memory before any work (0 disables the check). The base counts
        the float32 output and one full-resolution activation of 16 channels; a plugin whose
        decoder or attention is larger overrides this."""
        h, w = args.get("height"), args.get("width")
        if not isinstance(h, int) or not isinstance(w, int):
            return 0
        frames = args.get("num_frames") if isinstance(args.get("num_frames"), int) else 1
        return 4 * h * w * max(1, frames) * (3 + 16)

    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        progress: bool | None = None,
        **extra,
    ) -> Output:
        """Generate. The argument names are diffusers' (``num_inference_steps``, ``guidance_scale``,
        ``negative_prompt``, ``generator``, ``height``, ``width``, ``num_frames``); ``seed`` is the
        DiffSynth-Studio way to seed, and a ``generator`` (a CPU ``torch.Generator``) takes its place
        when given. Unset arguments take the preset's defaults; ``progress=None`` shows a progress bar
        only on a terminal. ``steps`` (plugin contract 1.0) still works as ``num_inference_steps``, with
        a DeprecationWarning. Returns an :class:`core.outputs.Output`."""
        args = self.resolve(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, seed=seed, height=height, width=width, **extra,
        )
        args["generator"] = generator
        self.check_inputs(args)
        with torch.inference_mode(), (self.offload.generation() if self.offload is not None else contextlib.nullcontext()):
            output = self.generate(progress=progress, **contract.generate_arguments(self, args))
        # one place for every plugin: a non-Output or non-finite result never reaches a writer
        guards.check_output_tensors(output, plugin=self._plugin_name(), model=self._model_name())
        self.trace("output", output.tensor())
        return output

    def _model_name(self) -> str:
        return self.spec.name if self.spec is not None else type(self).__name__

    def _plugin_name(self) -> str:
        return getattr(self, "plugin_name", None) or type(self).__module__.split(".")[0]

    def generate(self, **args) -> Output:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement generate()")

    # -- tracing (the reference-parity ladder) ------------------------------------------------
    @contextlib.contextmanager
    def tracing(self) -> Iterator[dict[str, Any]]:
        """Record the stages of the generations run inside the block (:data:`REFERENCE_STAGES`,
        plus ``noise``) into the yielded dict, for comparison with an independent reference.
        Outside the block nothing is recorded and nothing is copied."""
        previous, self._trace = self._trace, {}
        try:
            yield self._trace
        finally:
            self._trace = previous

    def trace(self, stage: str, value) -> None:
        """Record ``value`` (a tensor, or a tuple/dict of tensors) as ``stage`` of the generation
        being traced; a later record of the same stage replaces an earlier one. A no-op unless
        inside :meth:`tracing`."""
        if self._trace is not None:
            self._trace[stage] = _detached(value)

    # -- shared sampling -----------------------------------------------------------------------
    def noise(self, shape, seed: int, dtype=torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
        """Seeded noise, identical on every device and rank (drawn on the CPU). A ``generator``
        (the caller's, diffusers-style) is drawn from instead of ``seed`` when given."""
        x = noise(shape, seed, device=self.device, dtype=dtype, generator=generator)
        if self.parallel is not None:
            self.parallel.check_same(x, what="initial noise")
        self.trace("noise", x)
        return x

    def denoise(
        self,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        velocity: Velocity,
        *,
        guidance_scale: float | Callable[[int, float], float] = 1.0,
        cfg_rescale_dim: int | None = None,
        progress: bool | None = None,
        desc: str = "denoising",
    ) -> torch.Tensor:
        """Flow-matching Euler loop with classifier-free guidance.

        ``velocity(x, sigma, branch, step)`` runs the model for one branch ("cond" / "uncond") at
        noise level ``sigma`` (a 0-d float32 tensor, so compiled models never specialise on it).
        ``guidance_scale`` may depend on the step (``fn(step, sigma)``); at 1.0 the unconditional
        branch is skipped.
        """
        steps = len(sigmas) - 1
        self.trace("sigmas", sigmas)
        for i in self.progress_bar(range(steps), progress=progress, desc=desc):
            sigma = sigmas[i].to(torch.float32)
            scale = guidance_scale(i, float(sigma)) if callable(guidance_scale) else guidance_scale
            branches = ("cond", "uncond") if scale != 1.0 else ("cond",)
            if self.parallel is not None:
                preds = self.parallel.run_branches(lambda b: velocity(x, sigma, b, i), branches)
            else:
                preds = {b: velocity(x, sigma, b, i) for b in branches}
            if i == 0:
                self.trace("velocity", preds["cond"])
            v = preds["cond"] if len(branches) == 1 else guide(preds["cond"], preds["uncond"], scale, cfg_rescale_dim)
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
            if not bool(torch.isfinite(x).all()):  # one reduction per step: stop at the first bad step
                raise GenerationError(
                    f"{self._model_name()}: the latent became non-finite (NaN or inf) at denoising step {i + 1} of "
                    f"{steps} (sigma {float(sigma):.4g}); nothing was written", step=i + 1)
        self.trace("latents", x)
        return x

    def progress_bar(self, iterable, *, progress: bool | None = None, desc: str = ""):
        """tqdm over ``iterable``: on a terminal by default, forced on/off by ``progress``;
        shown on rank 0 only under USP."""
        from tqdm.auto import tqdm

        if self.parallel is not None and not self.parallel.is_main:
            progress = False
        disable = None if progress is None else not progress
        return tqdm(iterable, desc=desc, disable=disable, leave=False)


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value
