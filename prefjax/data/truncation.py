"""Length limits on tokenized examples: truncate or drop, with counters.

    cfg = TruncationConfig(max_prompt_len=256, max_response_len=512, max_len=768)
    counter = TruncationCounter()
    kept = truncate(tok_ex, cfg, bos_id=tokenizer.bos_token_id, counter=counter)   # None if dropped
    counter.as_dict()   # {"examples": ..., "prompt_truncated": ..., "dropped": ..., ...}

Limits, applied in this order:

1. ``max_prompt_len``: a longer prompt is cut by ``prompt_mode``.
2. ``max_response_len``: each longer response is cut by ``response_mode``.
3. ``max_len`` (prompt + one response, i.e. one row of the unpacked layout): each response
   that still overflows is cut by ``response_mode`` to the room the prompt leaves; with no
   room at all the example is dropped (set ``max_prompt_len`` below ``max_len`` to guarantee
   room).

Modes:

- ``keep_end`` (the prompt default): keep the last tokens. For a prompt these are the most
  recent turns and the generation prompt, which the response depends on most; the leading
  BOS is kept as well (``keep_bos``), since models are trained to see it first.
- ``keep_start`` (the response default): keep the first tokens. A cut response loses its
  end-of-turn token, i.e. the model is scored on a prefix of the response.
- ``drop``: drop the whole example.

An example whose truncated response keeps no scored token is dropped too ("no_scored").
Counters are thread-safe, because grain preprocesses in several threads.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Optional

import numpy as np

from prefjax.data.tokenize import TokenizedExample

MODES = ("keep_start", "keep_end", "drop")
DROP_REASONS = ("prompt_too_long", "response_too_long", "sequence_too_long", "no_scored")


@dataclasses.dataclass(frozen=True)
class TruncationConfig:
    """Token limits (None = no limit) and what to do past them (see the module docstring)."""

    max_prompt_len: Optional[int] = None
    max_response_len: Optional[int] = None
    max_len: Optional[int] = None
    prompt_mode: str = "keep_end"
    response_mode: str = "keep_start"
    keep_bos: bool = True

    def __post_init__(self) -> None:
        for name in ("prompt_mode", "response_mode"):
            if getattr(self, name) not in MODES:
                raise ValueError(
                    f"TruncationConfig.{name} must be one of {MODES}, got {getattr(self, name)!r}"
                )
        for name in ("max_prompt_len", "max_response_len", "max_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"TruncationConfig.{name} must be a positive integer or None, got {value!r}")
        if (
            self.max_len is not None
            and self.max_prompt_len is not None
            and self.max_prompt_len >= self.max_len
        ):
            raise ValueError(
                f"TruncationConfig: max_prompt_len ({self.max_prompt_len}) must be below max_len "
                f"({self.max_len}) to leave room for a response"
            )


@dataclasses.dataclass(frozen=True)
class TruncationEvent:
    """What truncation did to one example."""

    prompt_truncated: bool = False
    responses_truncated: int = 0
    dropped: Optional[str] = None  # one of DROP_REASONS
    tokens_removed: int = 0


class TruncationCounter:
    """Thread-safe running totals of truncation events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {
            "examples": 0,
            "prompt_truncated": 0,
            "response_truncated": 0,
            "examples_truncated": 0,
            "dropped": 0,
            "tokens_removed": 0,
        }
        self._counts.update({f"dropped_{reason}": 0 for reason in DROP_REASONS})

    def add(self, event: TruncationEvent) -> None:
        with self._lock:
            self._counts["examples"] += 1
            self._counts["prompt_truncated"] += int(event.prompt_truncated)
            self._counts["response_truncated"] += event.responses_truncated
            self._counts["examples_truncated"] += int(event.prompt_truncated or event.responses_truncated > 0)
            self._counts["tokens_removed"] += event.tokens_removed
            if event.dropped is not None:
                self._counts["dropped"] += 1
                self._counts[f"dropped_{event.dropped}"] += 1

    def as_dict(self) -> dict[str, float]:
        """Counts plus ``truncated_rate`` and ``dropped_rate`` (fractions of examples seen)."""
        with self._lock:
            counts: dict[str, float] = dict(self._counts)
        seen = max(counts["examples"], 1)
        counts["truncated_rate"] = counts["examples_truncated"] / seen
        counts["dropped_rate"] = counts["dropped"] / seen
        return counts


def _cut(ids: np.ndarray, limit: int, mode: str, keep_first: Optional[int] = None) -> np.ndarray:
    """``ids`` cut to ``limit`` tokens by ``mode`` (keep_start / keep_end); ``keep_first`` pins a BOS."""
    if len(ids) <= limit:
        return ids
    if mode == "keep_start":
        return ids[:limit]
    if keep_first is not None and len(ids) and ids[0] == keep_first and limit >= 2:
        return np.concatenate([ids[:1], ids[len(ids) - (limit - 1) :]])
    return ids[len(ids) - limit :]


def _cut_response(ids: np.ndarray, mask: np.ndarray, limit: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    if mode == "keep_start":
        return ids[:limit], mask[:limit]
    return ids[len(ids) - limit :], mask[len(mask) - limit :]


def truncate_example(
    example: TokenizedExample, config: TruncationConfig, bos_id: Optional[int] = None
) -> tuple[Optional[TokenizedExample], TruncationEvent]:
    """(the example within the limits, or None if dropped; what happened)."""
    total = sum(len(r) for r in example.response_ids) + len(example.prompt_ids)
    prompt = example.prompt_ids
    prompt_truncated = False
    if config.max_prompt_len is not None and len(prompt) > config.max_prompt_len:
        if config.prompt_mode == "drop":
            return None, TruncationEvent(dropped="prompt_too_long")
        prompt = _cut(prompt, config.max_prompt_len, config.prompt_mode, bos_id if config.keep_bos else None)
        prompt_truncated = True
    responses, masks, cut = [], [], 0
    for ids, mask in zip(example.response_ids, example.response_masks):
        limits = [config.max_response_len] if config.max_response_len is not None else []
        if config.max_len is not None:
            room = config.max_len - len(prompt)
            if room < 1:
                return None, TruncationEvent(prompt_truncated=prompt_truncated, dropped="sequence_too_long")
            limits.append(room)
        limit = min(limits) if limits else len(ids)
        if len(ids) > limit:
            if config.response_mode == "drop":
                reason = (
                    "response_too_long"
                    if config.max_response_len is not None and len(ids) > config.max_response_len
                    else "sequence_too_long"
                )
                return None, TruncationEvent(prompt_truncated=prompt_truncated, dropped=reason)
            ids, mask = _cut_response(ids, mask, limit, config.response_mode)
            cut += 1
            if not mask.any():
                return None, TruncationEvent(
                    prompt_truncated=prompt_truncated, responses_truncated=cut, dropped="no_scored"
                )
        responses.append(ids)
        masks.append(mask)
    kept = dataclasses.replace(example, prompt_ids=prompt, response_ids=responses, response_masks=masks)
    removed = total - len(prompt) - sum(len(r) for r in responses)
    return kept, TruncationEvent(
        prompt_truncated=prompt_truncated, responses_truncated=cut, tokens_removed=removed
    )


def truncate(
    example: TokenizedExample,
    config: TruncationConfig,
    bos_id: Optional[int] = None,
    counter: Optional[TruncationCounter] = None,
) -> Optional[TokenizedExample]:
    """:func:`truncate_example`, recording the event in ``counter``; None if the example is dropped."""
    kept, event = truncate_example(example, config, bos_id)
    if counter is not None:
        counter.add(event)
    return kept
