"""Third-party noise kept out of the kit's output, and the contract deprecations it reports instead.

A plugin built on diffusers or transformers makes them talk while the kit runs: diffusers' notice
about modules "that should be kept in float32" on every dtype cast, transformers' "Writing model
shards" bar when a checkpoint writer calls ``save_pretrained``. None of it is about the plugin's
conformance, so the kit turns those libraries' own switches (verbosity, progress bars) down for the
duration of each check and restores them after; their errors still show.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import ExitStack, contextmanager
from typing import Iterator

from ..contract import ContractDeprecationWarning

__all__ = ["quiet_libraries", "recording_deprecations"]

_LOGGING_LIBRARIES = ("diffusers", "transformers")
"""Libraries with the Hugging Face logging API (``<lib>.utils.logging``: verbosity, progress bar)."""


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block, the already imported Hugging Face libraries log errors only and show no
    progress bar (a library imported inside the block is quieted by the next block)."""
    with ExitStack() as undo:
        for name in _LOGGING_LIBRARIES:
            if name not in sys.modules:
                continue
            try:
                api = __import__(f"{name}.utils.logging", fromlist=["logging"])
            except ImportError:
                continue
            level, bars = api.get_verbosity(), api.is_progress_bar_enabled()
            api.set_verbosity_error()
            api.disable_progress_bar()
            undo.callback(api.set_verbosity, level)
            if bars:
                undo.callback(api.enable_progress_bar)
        hub = sys.modules.get("huggingface_hub")
        if hub is not None and not hub.utils.are_progress_bars_disabled():
            hub.utils.disable_progress_bars()
            undo.callback(hub.utils.enable_progress_bars)
        yield


@contextmanager
def recording_deprecations(into: list[str]) -> Iterator[None]:
    """Append to ``into`` the message of every :class:`ContractDeprecationWarning` raised in the block
    (each message once), so the kit reports which contract-1.0 names a plugin still uses."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ContractDeprecationWarning)
            yield
    finally:
        for w in caught:  # outside the recording block: what is passed on is not caught again
            if issubclass(w.category, ContractDeprecationWarning):
                if str(w.message) not in into:
                    into.append(str(w.message))
            else:  # everything else goes on as if it had not been caught
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
