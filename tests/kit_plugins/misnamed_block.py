"""Declares a repeated block class that does not exist ("JointBlok")."""
from ._base import example_spec, plugin_module_hook

spec = example_spec().model_copy(update={"name": "wrong-block", "aliases": [],
                                         "repeated_blocks": {"dit": ["JointBlok", "SingleBlock"]}})
ditkit_register_models = plugin_module_hook(spec)
