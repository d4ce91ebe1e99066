"""``--json [FILE]``, the same for every ``ditkit`` command that reports numbers (``check``, ``bench``).

``--json`` alone prints the JSON report on stdout instead of the table (for a pipe: nothing else is
written to stdout); ``--json FILE`` prints the table as usual and writes the report to ``FILE``
(atomically: an interrupted run leaves the previous file). Without ``--json`` only the table is printed.
"""
from __future__ import annotations

import argparse

__all__ = ["STDOUT", "add_json_argument", "write_json"]

STDOUT = "-"


class _JsonTarget(argparse.Action):
    """FILE must end in ``.json`` (or be ``-``): ``ditkit check --json my-model`` would otherwise
    silently take the model name for the file."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value != STDOUT and not value.lower().endswith(".json"):
            raise argparse.ArgumentError(self, f"expected a file name ending in .json (or nothing, for stdout), got "
                                               f"{value!r}; put --json last or right before its FILE")
        setattr(namespace, self.dest, value)


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", nargs="?", const=STDOUT, default=None, metavar="FILE", action=_JsonTarget,
                        help="the report as JSON: on stdout instead of the table, or written to FILE (.json) "
                             "besides the table")


def write_json(text: str, target: str) -> None:
    """Print ``text`` (a JSON document) when ``target`` is stdout, else write it to ``target``."""
    if target == STDOUT:
        print(text)
        return
    from .outputs import atomic_path  # here, not at the top: the CLI's parser must not import the writers

    with atomic_path(target) as tmp:
        tmp.write_text(text + "\n")
