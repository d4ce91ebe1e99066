"""Its USP adapter splits the rotary table along its frequency pairs (dim 1), not its tokens."""
from core.spec import SequenceSplit

from ._base import example_spec, plugin_module_hook

_spec = example_spec()
_adapter = _spec.usp[0].model_copy(update={"splits": [SequenceSplit(module="patch_embed", at="output", dim=1),
                                                      SequenceSplit(module="rope", at="output", dim=1)]})
spec = _spec.model_copy(update={"name": "wrong-usp", "aliases": [], "usp": [_adapter]})
ditkit_register_models = plugin_module_hook(spec)
