"""Bridges from other libraries' models to ditkit.

Each bridge is its own module and imports its library when imported, so ``import core`` never
pulls one in: ``core.integrations.diffusers`` needs the ``diffusers`` extra
(``pip install "ditkit[diffusers]"``).
"""
