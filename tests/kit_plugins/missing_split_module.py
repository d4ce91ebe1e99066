"""Its USP adapter splits at a submodule that does not exist ('patch_embedder', not 'patch_embed')."""
from core.spec import SequenceSplit

from ._base import example_spec, plugin_module_hook

_spec = example_spec()
_adapter = _spec.usp[0].model_copy(update={"splits": [SequenceSplit(module="patch_embedder", at="output", dim=1),
                                                      SequenceSplit(module="rope", at="output", dim=0)]})
spec = _spec.model_copy(update={"name": "wrong-usp-module", "aliases": [], "usp": [_adapter]})
ditkit_register_models = plugin_module_hook(spec)
