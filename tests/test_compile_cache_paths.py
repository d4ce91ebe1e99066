"""Compile caches never stop a run: every cache path is checked before any work, and one that
cannot be written (a regular file, under a regular file, read-only) is one warning while the
run goes on and writes its output."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import core
from core.compile_cache import CompileCacheWarning, check_compile_caches, unwritable_reason

from .conftest import ROOT, subprocess_env


def test_unwritable_reason_names_the_file_in_the_way(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file" in unwritable_reason(afile)
    assert str(afile) in unwritable_reason(afile / "under" / "deeper")
    assert unwritable_reason(tmp_path / "new" / "folder") is None and (tmp_path / "new" / "folder").is_dir()
    assert os.listdir(tmp_path / "new" / "folder") == []  # the probe is gone


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_an_unwritable_ditkit_compile_cache_is_one_warning_then_off(tmp_path, monkeypatch, where):
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("DITKIT_COMPILE_CACHE", str(afile if where == "file" else afile / "sub"))
    with pytest.warns(CompileCacheWarning, match="DITKIT_COMPILE_CACHE.*cannot be written") as caught:
        assert check_compile_caches(tmp_path / "bundles") == str(tmp_path / "bundles")
        assert check_compile_caches(None) is None  # checked again: no second warning
    assert len([w for w in caught if w.category is CompileCacheWarning]) == 1
    assert os.environ["DITKIT_COMPILE_CACHE"] == "off"


_AS_NOBODY = textwrap.dedent("""
    import os, sys, warnings
    from core.compile_cache import check_compile_caches
    os.environ["DITKIT_COMPILE_CACHE"] = "off"
    check_compile_caches(None)  # its imports (torch's inductor config) while still root: the venv lives under /root
    if os.getuid() == 0:
        os.setuid(65534)  # root writes anywhere: become nobody
    os.environ["DITKIT_COMPILE_CACHE"] = sys.argv[1]
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = check_compile_caches(sys.argv[2])
    print(kept)
    for w in caught:
        print(w.category.__name__, w.message)
""")


def test_read_only_caches_are_warnings_not_errors():
    top = Path(tempfile.mkdtemp(prefix="ditkit-ro-cache-"))  # pytest's tmp_path is 0700: nobody could not reach it
    try:
        os.chmod(top, 0o755)
        ro = top / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        # the kernel cache under a read-only folder, the bundle folder an existing read-only one (only a probe file sees it)
        res = subprocess.run([sys.executable, "-c", _AS_NOBODY, str(ro), str(ro)], capture_output=True,
                             text=True, env=subprocess_env(), timeout=120, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-2000:]
        kept, *warned = res.stdout.splitlines()
        assert kept == "None" and len(warned) == 2 and all(w.startswith("CompileCacheWarning") for w in warned)
        assert "DITKIT_COMPILE_CACHE" in warned[0] and "--compile-cache" in warned[1]
        assert all("ermission denied" in w for w in warned) and os.listdir(ro) == []
    finally:
        os.chmod(top / "ro", 0o755)
        import shutil

        shutil.rmtree(top)


@pytest.fixture
def eager_backend(monkeypatch):
    """compile_pipeline with dynamo's eager backend: the CLI's cache handling is what is tested,
    not inductor (seconds instead of a minute)."""
    real = core.pipeline.Pipeline.compile_pipeline
    monkeypatch.setattr(core.pipeline.Pipeline, "compile_pipeline",
                        lambda self, **kw: real(self, backend="eager", **kw))


def test_cli_with_unwritable_caches_warns_once_each_and_writes_its_output(example, eager_backend, tmp_path,
                                                                           monkeypatch, capsys):
    from core.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("DITKIT_COMPILE_CACHE", str(afile / "under"))
    out = tmp_path / "fox.png"
    code = main(["run", "example", "--steps", "1", "--height", "32", "--width", "32", "--no-progress",
                 "--compile-cache", str(afile), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and out.is_file(), err
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("ditkit: warning:") for line in lines), err
    assert "DITKIT_COMPILE_CACHE" in lines[0] and "--compile-cache" in lines[1] and "Traceback" not in err


def test_cli_saves_the_bundle_after_the_output_and_a_failed_save_is_a_warning(example, eager_backend, tmp_path,
                                                                              monkeypatch, capsys):
    from core.cli import main

    out, seen = tmp_path / "fox.png", []

    def failing_save(self):
        seen.append(out.is_file())  # the output is already written when the bundle is saved
        raise PermissionError(13, "Permission denied", str(tmp_path / "cache"))

    monkeypatch.setattr(core.pipeline.Pipeline, "save_compile_cache", failing_save)
    code = main(["run", "example", "--steps", "1", "--height", "32", "--width", "32", "--no-progress",
                 "--compile-cache", str(tmp_path / "cache"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and out.is_file() and seen == [True], err
    assert err.startswith("ditkit: warning: compile cache not saved: Permission denied") and err.count("\n") == 1, err


def test_a_bundle_whose_load_raises_is_unreadable_not_loaded(tmp_path, monkeypatch):
    """torch un-pickles a bundle inside its own try (truncated or garbage bytes: None, covered in
    test_compile.py), but filling the caches from a well-formed one can still raise (a cache folder
    it cannot write, an artifact of another torch): that bundle is unreadable too."""
    import torch

    from core.compile_cache import load_bundle

    bundle = tmp_path / "m.compile-cache"
    assert load_bundle(bundle) == "absent"
    bundle.write_bytes(b"well-formed, say")

    def raising(data):
        raise PermissionError(13, "Permission denied", "/ro/inductor")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", raising)
    assert load_bundle(bundle) == "unreadable"
