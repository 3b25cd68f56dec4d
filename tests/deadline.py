"""A deadline for tests of code that must never hang: a regression fails the test instead of
stalling CI (pytest-timeout is not a dependency of this project).

    result = run_within(60, fn, *args)   # fn's result, its exception re-raised, or a failure
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest


def run_within(seconds: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Calls fn in a daemon thread; fails the test if it has not returned after `seconds`."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 -- re-raised in the caller's thread below
            outcome["error"] = err

    # A daemon thread: a hung call cannot keep the test process alive after the failure.
    thread = threading.Thread(target=target, daemon=True, name=f"deadline:{getattr(fn, '__name__', fn)}")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {seconds} s (a hang)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
