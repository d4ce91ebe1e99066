"""Every size it lets the kit draw (and its "uneven" call) splits into equal shards: 64 and 16·k
image tokens on 2 ranks. The kit must refuse to call USP parity proven for uneven lengths."""
from core.spec import SizeRange

from ._base import example_spec, plugin_module_hook

_spec = example_spec()
_even = _spec.conformance.model_copy(update={
    "sizes": {"height": SizeRange(min=32, max=64, multiple=16), "width": SizeRange(min=32, max=64, multiple=16)},
    "uneven_call": {"height": 64, "width": 64},
})
spec = _spec.model_copy(update={"name": "even-lengths", "aliases": [], "conformance": _even})
ditkit_register_models = plugin_module_hook(spec)
