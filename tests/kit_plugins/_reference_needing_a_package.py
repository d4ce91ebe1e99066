"""A reference module whose test-time dependency is not installed (imported at module level)."""
import ditkit_no_such_package  # noqa: F401


def reference(pipe, call, noise):  # pragma: no cover - never reached
    raise AssertionError("unreachable")
