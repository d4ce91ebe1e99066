"""Independent implementations of MOVA's architecture, for the parity tests only.

* DiffSynth-Studio 2.1.12 (``diffsynth``): ``MovaAudioDit``, ``DualTowerConditionalBridge``,
  ``DacVAE`` and its Wan DiT blocks;
* Descript's ``descript-audio-codec`` 1.0.0 (``dac``): the DAC encoder/decoder blocks.

Neither is a dependency of ditkit: they live in a test-only folder, which the tests install
without their dependencies the first time they need it (``REFS_INSTALL``)::

    python -m pip install --no-deps --target .cache/mova-refs diffsynth==2.1.12 descript-audio-codec==1.0.0

(``DITKIT_MOVA_REFS`` points elsewhere; the folder and the importer are
:mod:`plugins.mova.reference`'s, whose MOVA reference uses DiffSynth too).  The tests **fail**
(never skip) when it cannot be installed.  Only the model files are imported: the packages' ``__init__`` modules pull in download,
audio-IO and training code (``modelscope``, ``audiotools``, ``argbind``), which is replaced by
empty packages here; nothing the compared modules compute goes through a stub.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

from plugins.mova.reference import REFS, REFS_INSTALL, diffsynth_modules, import_without_init


def _require(package: str) -> Path:
    """The reference's folder, installed there first (like the example plugins, by the tests
    themselves) when it is missing; a failed install fails the test, never skips it."""
    path = REFS / package
    if not (path / "__init__.py").is_file():
        import subprocess

        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(REFS),
               "diffsynth==2.1.12", "descript-audio-codec==1.0.0"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode or not (path / "__init__.py").is_file():
            pytest.fail(f"the parity reference {package!r} could not be installed in {REFS} ({REFS_INSTALL}):\n"
                        f"{res.stderr[-2000:]}", pytrace=False)
    return path


def diffsynth():
    """``(mova_audio_dit, mova_dual_tower_bridge, mova_audio_vae, wan_video_dit)`` modules of DiffSynth
    (imported as :func:`plugins.mova.reference.diffsynth_modules` does, for MOVA's reference)."""
    _require("diffsynth")
    ds = diffsynth_modules()
    return ds.audio, ds.bridge, ds.vae, ds.wan


def descript_dac():
    """Descript's ``dac.model.dac`` module (Encoder/Decoder blocks with weight norm)."""
    root = _require("dac")
    import_without_init("dac", root)
    if "audiotools" not in sys.modules:  # audio IO and the training base class: not used by the blocks
        audiotools = types.ModuleType("audiotools")
        ml = types.ModuleType("audiotools.ml")

        class BaseModel(__import__("torch").nn.Module):
            INTERN: list = []
            EXTERN: list = []

        ml.BaseModel = BaseModel
        audiotools.ml, audiotools.AudioSignal, audiotools.STFTParams = ml, object, object
        sys.modules["audiotools"], sys.modules["audiotools.ml"] = audiotools, ml
    import_without_init("dac.nn", root / "nn")
    import_without_init("dac.model", root / "model")
    importlib.import_module("dac.nn.layers")
    importlib.import_module("dac.nn.quantize")
    # base.py holds CodecMixin/DACFile: file IO and chunked compression helpers, not the blocks
    sys.modules.setdefault("dac.model.base", types.SimpleNamespace(CodecMixin=object, DACFile=object))
    return importlib.import_module("dac.model.dac")
