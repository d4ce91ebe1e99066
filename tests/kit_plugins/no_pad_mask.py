"""A mutation: USP with the pad-key mask switched off (padded keys then act as zero keys).

Importing this module patches the router in the importing process; the kit's USP check imports
the plugin in every rank, so each rank runs without the mask. It re-exports the example plugin's
and the Wan plugin's models unchanged: only the core's mechanism is broken.
"""
import core.parallel.router as router

router.mask_padded_keys = lambda q, k, v, key_valid: (q, k, v)

from plugins.wan.plugin import ditkit_register_models as _wan_models  # noqa: E402

from core import hookimpl  # noqa: E402

from ._base import example_spec  # noqa: E402


@hookimpl
def ditkit_register_models():
    wan = [s for s in _wan_models() if s.name == "wan2.1-t2v-1.3b"]
    return [example_spec(), *wan]
