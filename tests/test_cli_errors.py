"""The CLI's user errors in the user's words: the flag typed, the plugin module given, the rank
and signal that ended a parallel run; and ``ditkit run --help`` documents every flag."""
from __future__ import annotations

import os
import pickle
import signal
import sys
import textwrap
import time

import pytest

from core.cli import _generation_args, _one_line, build_parser, main
from core.cli_flags import RUN_FLAGS


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, flag, python_name", [
    (["--steps", "0"], "--steps", "num_inference_steps"),
    (["--guidance-scale", "-1"], "--guidance-scale", "guidance_scale"),
    (["--num-frames", "6"], "--num-frames", "num_frames"),
    (["--height", "33"], "--height", None),
])
def test_run_errors_name_the_flag_the_user_typed(capsys, tmp_path, argv, flag, python_name):
    code, err = run_cli(capsys, "run", "wan", "--out", tmp_path / "v.mp4", *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("ditkit: error:")
    assert flag in err and (python_name is None or python_name not in err), err


def test_run_flags_table_covers_every_generation_flag():
    """Every generation argument ``ditkit run`` passes has a flag in RUN_FLAGS, and that flag exists."""
    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" run"))
    flags = {opt for action in run._actions for opt in action.option_strings}
    args = run.parse_args(["wan", "--steps", "2", "--height", "16", "--width", "16", "--guidance-scale", "2",
                           "--negative-prompt", "x", "--num-frames", "5"])
    produced = set(_generation_args(args)) | {"prompt", "seed", "image"}
    assert produced <= set(RUN_FLAGS) and set(RUN_FLAGS.values()) <= flags


def test_run_help_explains_every_flag_and_the_out_default():
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    undocumented = [a.option_strings or a.dest for a in run._actions if not a.help]
    assert undocumented == []
    out = next(a for a in run._actions if "--out" in a.option_strings)
    assert "default" in out.help and ".mp4" in out.help


def test_check_with_a_plugin_module_that_does_not_import_is_one_line(capsys):
    code, err = run_cli(capsys, "check", "my-model", "--plugin", "no_such_pkg_for_ditkit.plugin")
    assert code == 2 and err.count("\n") == 1 and err.startswith("ditkit: error: --plugin")
    assert "no_such_pkg_for_ditkit" in err and "ModuleNotFoundError" in err


def test_a_sigkilled_rank_is_reported_with_its_signal(tmp_path):
    """Rank 1 killed outright; rank 0 then fails on the lost connection. The line names rank 1 and
    SIGKILL, with rank 0's error only as the consequence."""
    from core.parallel.launch import _failure

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error: Connection reset by peer")
    payload = ("error", time.time(), "RuntimeError", str(gloo), "Traceback ...", pickle.dumps(gloo))
    (tmp_path / "0.pkl").write_bytes(pickle.dumps(payload))
    died = {1: time.time() - 0.1, 0: time.time()}
    line = _one_line(_failure(str(tmp_path), [1, -signal.SIGKILL], died))
    assert line.startswith("rank 1 was killed by SIGKILL"), line
    assert "as a consequence rank 0" in line and "\n" not in line


_KBD_PLUGIN = "raise KeyboardInterrupt\n"
_SIGINT_PLUGIN = textwrap.dedent("""
    import os, signal, time
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
""")


def _entry_point(tmp_path, monkeypatch, name: str, source: str):
    import importlib.metadata as md

    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return md.EntryPoint(name=name, value=name, group="ditkit.plugins")


def test_a_plugin_raising_keyboardinterrupt_at_import_is_that_plugins_failure(tmp_path, monkeypatch):
    from core.registry import PluginLoadWarning, Registry

    ep = _entry_point(tmp_path, monkeypatch, "ditkit_kbd_plugin", _KBD_PLUGIN)
    try:
        with pytest.warns(PluginLoadWarning, match="ditkit_kbd_plugin.*KeyboardInterrupt"):
            registry = Registry(strict=False).discover([ep])
    except KeyboardInterrupt:  # would stop pytest itself: report it as this test's failure
        pytest.fail("the plugin's own KeyboardInterrupt escaped the registry as if the user pressed Ctrl-C")
    assert [f.plugin for f in registry.failures] == ["ditkit_kbd_plugin"]


def test_a_plugin_module_raising_keyboardinterrupt_is_that_modules_error(tmp_path, monkeypatch, capsys):
    """``ditkit check --plugin MODULE``: the module's own KeyboardInterrupt is its import failure,
    one error line naming it (was "ditkit: interrupted", exit 130)."""
    _entry_point(tmp_path, monkeypatch, "ditkit_kbd_module", _KBD_PLUGIN)
    try:
        code, err = run_cli(capsys, "check", "my-model", "--plugin", "ditkit_kbd_module")
    except KeyboardInterrupt:
        pytest.fail("the plugin module's own KeyboardInterrupt escaped as if the user pressed Ctrl-C")
    finally:
        sys.modules.pop("ditkit_kbd_module", None)
    assert code == 2 and err.count("\n") == 1 and err.startswith("ditkit: error: --plugin"), err
    assert "ditkit_kbd_module" in err and "KeyboardInterrupt" in err


def test_ctrl_c_while_a_plugin_imports_is_still_the_users_interrupt(tmp_path, monkeypatch):
    from core.registry import Registry

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not handled by Python's default handler in this process")
    ep = _entry_point(tmp_path, monkeypatch, "ditkit_sigint_plugin", _SIGINT_PLUGIN)
    with pytest.raises(KeyboardInterrupt):
        Registry(strict=False).discover([ep])
    sys.modules.pop("ditkit_sigint_plugin", None)


def test_ditkits_own_warnings_are_one_line_from_rank_0_only(monkeypatch, capsys):
    import warnings

    from core.cli_warnings import warnings_as_lines
    from core.compile_cache import CompileCacheWarning

    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with warnings_as_lines():
                warnings.warn("compile cache\n   not saved", CompileCacheWarning)
        err = capsys.readouterr().err
        assert err == "ditkit: warning: compile cache not saved\n" * lines, (rank, err)
