"""Wan 2.1 / 2.2 reference plugin."""
