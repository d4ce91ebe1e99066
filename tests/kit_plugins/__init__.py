"""Deliberately wrong variants of the example plugin: each must fail one conformance check only.

They import ``ditkit_example``, so the example plugin's install folder must be on ``sys.path``."""
