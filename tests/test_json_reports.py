"""``ditkit check --json [FILE]`` and ``ditkit bench --json [FILE]`` behave alike: alone, the JSON report
on stdout instead of the table; with FILE, the table as usual and the report in FILE."""
from __future__ import annotations

import json

import pytest

from core.cli import main


@pytest.mark.parametrize("command", [["check", "example-dit", "-k", "spec-valid"],
                                     ["bench", "example-dit", "--compare", "eager", "--steps", "1", "--height", "32",
                                      "--width", "32", "--no-progress"]])
def test_json_alone_goes_to_stdout_and_json_file_beside_the_table(example, command, tmp_path, capsys):
    assert main([*command, "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)  # stdout is the JSON document and nothing else
    assert alone["model"] == "example-dit"
    target = tmp_path / "report.json"
    assert main([*command, "--json", str(target)]) == 0
    table = capsys.readouterr().out
    assert "example-dit" in table and not table.lstrip().startswith("{")
    written = json.loads(target.read_text())
    assert written.keys() == alone.keys() and written["model"] == "example-dit"


def test_a_json_file_must_be_named_so(example, capsys):
    """``--json example-dit`` would otherwise take the model for the file name."""
    with pytest.raises(SystemExit) as code:
        main(["check", "--json", "example-dit"])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1 and err.startswith("ditkit: error:") and ".json" in err
