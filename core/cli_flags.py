"""The ``ditkit run`` flags that carry generation arguments, and error messages in their words.

The pipeline checks its arguments under their Python names (``num_inference_steps must be a
positive integer, got 0``); on the command line the user typed ``--steps 0``, so the CLI rewrites
each argument name of an :class:`core.InputError` into the flag that set it
(``--steps must be a positive integer, got 0``).
"""
from __future__ import annotations

import re

__all__ = ["RUN_FLAGS", "in_flag_terms", "without_option"]

RUN_FLAGS = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "negative_prompt": "--negative-prompt",
    "num_frames": "--num-frames",
    "height": "--height",
    "width": "--width",
    "seed": "--seed",
    "prompt": "--prompt",
    "image": "--image",
    "shift": "--shift",
}
"""Generation argument -> the ``ditkit run`` flag that sets it."""

_QUOTE = "'\"`"


def _pattern(name: str) -> re.Pattern:
    if "_" in name:  # an identifier: wherever it stands as a word
        return re.compile(rf"(?<![\w{_QUOTE}-]){name}(?![\w{_QUOTE}])=?")
    # a plain word (height, image, prompt) only where it names the argument: at the start of the
    # message, or followed by "must", "is", "holds", "=" or a value, never in prose ("an image")
    return re.compile(rf"(?:^|(?<=[\s(]))(?<![\w{_QUOTE}-]){name}(?:=|(?=\s+(?:(?:must|is|holds|gives)\b|-?\d)))")


_PATTERNS = {name: _pattern(name) for name in RUN_FLAGS}


def in_flag_terms(message: str) -> str:
    """``message`` with each generation argument name replaced by its ``ditkit run`` flag."""
    for name, pattern in _PATTERNS.items():
        message = pattern.sub(RUN_FLAGS[name], message)
    return message


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--option VALUE`` or ``--option=VALUE``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(f"{option}="):
            out.append(a)
    return out
