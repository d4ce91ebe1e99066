"""The plugin contract: every hook a ditkit plugin may implement.

A plugin is a module (or object) registered under the ``ditkit.plugins`` entry-point group. It
implements hooks with :data:`hookimpl`; each hook only *declares* by returning typed records
(:mod:`core.spec`), and the core does all the work. Hook names carry the ``ditkit_`` prefix; a
plugin that implements a ``ditkit_*`` name not listed here fails registration (pluggy's
``check_pending``), so a misspelled hook is an error, not silently dead.

Example plugin module::

    from core import hookimpl
    from core.spec import ModelSpec, Preset

    @hookimpl
    def ditkit_register_models():
        return [ModelSpec(name="my-dit", pipeline=build_pipeline,
                          presets={"tiny": Preset(random_weights=True, config={...})},
                          compilable_models=["dit"])]
"""
from __future__ import annotations

from typing import Sequence

import pluggy

from .spec import AttentionKernelSpec, ModelSpec

PROJECT = "ditkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Decorator for a plugin's hook implementations: ``@core.hookimpl``."""


@hookspec
def ditkit_register_models() -> Sequence[ModelSpec]:
    """Declare the models this plugin provides.

    Returns:
        A sequence of :class:`core.spec.ModelSpec` records (or dicts that validate as one). Each
        names the model (and aliases), its pipeline factory, presets (a random-weight ``tiny``
        preset is mandatory), the checkpoint layout it loads, the compilable components with
        their repeated block classes and called methods, USP adapters and capabilities.

    Called once per registry build, lazily (never at import time). Two plugins declaring the
    same name or alias is an error naming both distributions.

    Example::

        @hookimpl
        def ditkit_register_models():
            return [ModelSpec(name="example-dit", pipeline=ExamplePipeline.build,
                              presets={"tiny": Preset(random_weights=True)},
                              compilable_models=["dit", "vae"],
                              repeated_blocks={"dit": ["JointBlock", "SingleBlock"]},
                              compiled_methods={"vae": ["decode"]})]
    """


@hookspec
def ditkit_register_attention_kernels() -> Sequence[AttentionKernelSpec]:
    """Offer attention kernels that :func:`core.attention.attention` can dispatch to.

    Returns:
        A sequence of :class:`core.spec.AttentionKernelSpec`; each ``kernel(q, k, v, *, mask,
        scale)`` takes and returns ``(batch, heads, tokens, head_dim)`` tensors like
        ``torch.nn.functional.scaled_dot_product_attention``. A kernel is used only when selected
        (``DITKIT_ATTENTION=<name>`` or ``core.attention.use_kernel``).

    Example::

        @hookimpl
        def ditkit_register_attention_kernels():
            return [AttentionKernelSpec(name="my-flash", kernel=my_flash_attention)]
    """
