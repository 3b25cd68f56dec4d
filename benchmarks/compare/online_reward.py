"""The Python reward function both sides of the online benchmark call (standard library only).

Responses are words "w<id>" of the benchmark's word-level vocabulary (compare/online_workload.py).
The reward is a deterministic, continuous-looking function of the text, so that two random
samples almost never tie (a tie gives TRL a pair and prefjax a weight-0 example) and
the benchmark's pairs are the same in both frameworks.
"""

from __future__ import annotations

from typing import Sequence


def score(response: str) -> float:
    """Mean of (id mod 101) / 100 over the response's words; 0.0 for an empty response."""
    ids = [int(word[1:]) for word in response.split() if word[:1] == "w" and word[1:].isdigit()]
    return sum(i % 101 for i in ids) / (100.0 * len(ids)) if ids else 0.0


def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """prefjax's batched signature: fn(prompts, responses) -> one float per response."""
    del prompts
    return [score(r) for r in responses]


def trl_reward(prompts: Sequence[str], completions: Sequence[str], **unused) -> list[float]:
    """TRL's reward-function signature (keyword arguments it passes are ignored)."""
    del prompts, unused
    return [score(c) for c in completions]
