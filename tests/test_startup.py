"""A fast start: listing plugins, ``--help`` and usage errors import declarations only, and the
core's modules import each other without a cycle. (The time itself is measured by
``scripts/startup_time.py``, never in a test.)"""
from __future__ import annotations

import ast
import json
import subprocess
import sys

from .conftest import ROOT, subprocess_env

HEAVY_PACKAGES = ("transformers", "diffusers", "av", "tokenizers", "safetensors", "PIL", "sympy", "hypothesis")
HEAVY_MODULES = ("torch._dynamo", "torch._inductor", "core.pipeline", "core.loading", "core.compile", "core.outputs")

_PROBE = """
import contextlib, io, json, sys
from core.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    assert main(["plugins"]) == 0
    for argv in (["--help"], ["run", "--help"], ["run", "wan", "--steps", "abc"], ["bench", "wan", "--nosuch"]):
        try:
            main(argv)
        except SystemExit:
            pass
print(json.dumps(sorted(sys.modules)))
"""


def test_listing_help_and_usage_errors_import_declarations_only():
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=subprocess_env(),
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = json.loads(res.stdout)
    assert "plugins.wan.plugin" in loaded and "plugins.mova.plugin" in loaded  # the declarations were read
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY_PACKAGES or m in HEAVY_MODULES
             or (m.startswith("plugins.") and m.endswith(".pipeline"))]
    assert heavy == [], f"imported before any model was built: {heavy}"


def _core_import_graph() -> dict[str, set[str]]:
    """Module -> the ``core`` modules it imports, at top level or inside functions."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "core").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                edges.update(f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names)
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


KNOWN_BACK_EDGES = {
    ("core.testing.checks", "core.testing.usp"): "check_usp_parity imports the USP check, which imports the "
    "shared helpers of checks (breaking it moves code within a shared file)",
    ("core.testing.checks", "core.testing.reference"): "check_reference_parity, the same pattern",
    ("core.testing.checks", "core.testing.lora"): "the kit's lora checks, the same pattern",
    ("core.contract", "core"): "_running_version reads core.__version__ at call time",
    ("core.spec", "core.pipeline"): "Conformance's validator reads REFERENCE_STAGES at call time",
    ("core.compile_cache", "core.compile"): "check_compile_caches checks persistent_cache_dir's folder too",
}
"""Function-level imports that close a loop, each left for its file's owners with its reason; any
other cycle fails (the launcher importing ``core.cli`` again, say). Removing one is welcome: drop it here."""


def test_core_modules_import_each_other_without_a_cycle():
    graph = _core_import_graph()
    assert "core.parallel.launch" in graph["core.cli"]  # the graph sees function-level imports
    for module, target in KNOWN_BACK_EDGES:
        graph[module].discard(target)
    cycles = set()
    for start in graph:
        stack = [(start, (start,))]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.add(tuple(sorted(path)))
                elif nxt not in path:
                    stack.append((nxt, (*path, nxt)))
    assert not cycles, f"import cycles: {sorted(cycles)}"
