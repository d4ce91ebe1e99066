"""Every hook of the contract is documented and called by the core; kernels arrive through theirs."""
import importlib.metadata as md
import inspect

import pytest
import torch

import core
from core import attention, hookspecs

HOOKS = sorted(n for n, fn in vars(hookspecs).items() if n.startswith("ditkit_") and inspect.isfunction(fn))


@pytest.fixture
def every_hook(example_site, monkeypatch):
    """The registry built from entry points (``get_registry``), with one more entry point whose
    plugin implements every hook."""
    monkeypatch.syspath_prepend(str(example_site))
    from tests.kit_plugins import every_hook as plugin

    plugin.CALLED.clear()
    real = md.entry_points
    extra = md.EntryPoint("every-hook", "tests.kit_plugins.every_hook", "ditkit.plugins")

    def entry_points(**kw):
        found = list(real(**kw))
        return [*found, extra] if kw.get("group") == "ditkit.plugins" else found

    monkeypatch.setattr(core.registry.md, "entry_points", entry_points)
    monkeypatch.setattr(core.registry, "_registry", None)
    yield plugin
    monkeypatch.setattr(core.registry, "_registry", None)


def test_every_hook_is_documented_with_returns_and_an_example():
    assert HOOKS
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Returns:" in doc and "Example::" in doc, f"hook {name} needs Returns: and Example:: in its docstring"


def test_the_registry_calls_every_hook_and_uses_what_it_returns(every_hook):
    registry = core.get_registry()
    assert sorted(set(every_hook.CALLED)) == HOOKS  # each hook of the contract was called
    assert "every-hook" in core.list_models() and "counting" in [k.name for k in registry.kernels()]
    # the kernel arrived through its hook alone: selectable with no manual registration
    q = torch.randn(1, 5, 2, 8)
    with attention.use_kernel("counting"):
        out = attention.attention(q, q, q)
    assert every_hook.CALLED.count("kernel") == 1
    torch.testing.assert_close(out, attention.attention(q, q, q))


def test_an_unknown_kernel_name_lists_the_registered_ones(monkeypatch):
    monkeypatch.setenv("DITKIT_ATTENTION", "nope")
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="sdpa-flash"):
        attention.attention(q, q, q)
