"""Reward functions the online tests name as "tests.online.reward_fns:<name>"."""

from __future__ import annotations

from typing import Sequence


def digits(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """How many characters of the response are digits: varies between random samples, so pairs form."""
    del prompts
    return [float(sum(c.isdigit() for c in r)) for r in responses]
