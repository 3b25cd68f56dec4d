"""Row lengths and packing: bucketed padding, first-fit packing of sequences, padding waste.

Two layouts keep padding down while shapes stay few (every new shape recompiles the step):

- **Bucketed padding** (unpacked): a batch's rows are padded to the smallest bucket that
  holds its longest sequence. ``buckets`` is ``"pow2"`` (powers of two from ``min_bucket``),
  an int m (multiples of m), an explicit list, or None (always ``max_len``: one shape); the
  largest bucket is always ``max_len``.
- **Packing**: each example's K sequences are placed together, greedy first-fit in arrival
  order, into ``pack_rows`` rows of ``row_length`` tokens; segment ids 1, 2, ... tell the
  sequences of a row apart and positions restart at 0 for each. An example longer than a row
  spills its sequences one by one (first-fit each). Shapes are fixed, so an example that
  finds no room is an error (``pack_overflow="error"``: raise ``pack_rows``) or is left out
  of the batch with weight 0 (``"drop"``, counted). The data pipeline drops an example that
  fits no empty rows at all (:func:`fits_empty_rows`) before batching, so it takes no slot.

:class:`PaddingStats` accumulates, over batches, how many row slots hold real tokens,
filler-example tokens and padding.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Optional, Sequence, Union

import numpy as np

from prefjax.batch import Batch

Buckets = Union[None, str, int, Sequence[int]]
OVERFLOW_MODES = ("error", "drop")


class PackingOverflow(ValueError):
    """The examples of a batch do not fit in the packed rows."""


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """Row layout of a batch (see the module docstring).

    max_len: the longest sequence (prompt + one response); unpacked rows never exceed it.
    buckets / min_bucket: allowed unpacked row lengths.
    pack: pack sequences into ``pack_rows`` rows of ``row_length`` (default ``max_len``).
    """

    max_len: int
    buckets: Buckets = 64
    min_bucket: int = 16
    pack: bool = False
    row_length: Optional[int] = None
    pack_rows: Optional[int] = None
    pack_overflow: str = "error"

    def __post_init__(self) -> None:
        if not isinstance(self.max_len, int) or self.max_len < 2:
            raise ValueError(f"LayoutConfig.max_len must be an integer >= 2, got {self.max_len!r}")
        bucket_lengths(self.max_len, self.buckets, self.min_bucket)  # validates buckets
        if self.pack_overflow not in OVERFLOW_MODES:
            raise ValueError(
                f"LayoutConfig.pack_overflow must be one of {OVERFLOW_MODES}, got {self.pack_overflow!r}"
            )
        if self.pack:
            if self.pack_rows is None or self.pack_rows < 1:
                raise ValueError(
                    "LayoutConfig: pack=True needs pack_rows >= 1 (packed rows per batch; fixed so "
                    "that the train step compiles once)"
                )
            if self.packed_row_length < self.max_len:
                raise ValueError(
                    f"LayoutConfig.row_length ({self.row_length}) must be >= max_len ({self.max_len})"
                )

    @property
    def packed_row_length(self) -> int:
        return self.max_len if self.row_length is None else self.row_length


def bucket_lengths(max_len: int, buckets: Buckets, min_bucket: int = 16) -> list[int]:
    """The sorted allowed row lengths, the last being ``max_len``."""
    if buckets is None:
        lengths: list[int] = []
    elif isinstance(buckets, str):
        if buckets != "pow2":
            raise ValueError(f"buckets must be 'pow2', an int, a list of ints or None, got {buckets!r}")
        if min_bucket < 1:
            raise ValueError(f"min_bucket must be >= 1, got {min_bucket}")
        lengths, length = [], 1
        while length < max_len:
            if length >= min_bucket:
                lengths.append(length)
            length *= 2
    elif isinstance(buckets, int) and not isinstance(buckets, bool):
        if buckets < 1:
            raise ValueError(f"buckets as a multiple must be >= 1, got {buckets}")
        lengths = list(range(buckets, max_len, buckets))
    else:
        lengths = sorted(int(b) for b in buckets)
        if any(b < 1 for b in lengths):
            raise ValueError(f"bucket lengths must be >= 1, got {list(buckets)}")
    return sorted({b for b in lengths if b < max_len} | {max_len})


def bucket_length(length: int, max_len: int, buckets: Buckets, min_bucket: int = 16) -> int:
    """The smallest allowed row length >= ``length``; raises if ``length`` exceeds ``max_len``."""
    if length > max_len:
        raise ValueError(
            f"a sequence of {length} tokens exceeds max_len {max_len}; truncate first "
            f"(TruncationConfig.max_len)"
        )
    return next(b for b in bucket_lengths(max_len, buckets, min_bucket) if b >= length)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Sequence ``response`` of example ``example`` sits at ``row[start:start + length]``."""

    example: int
    response: int
    row: int
    start: int
    length: int


def _first_fit(free: list[int], need: int) -> Optional[int]:
    for row, room in enumerate(free):
        if room >= need:
            return row
    return None


def place_example(free: list[int], seq_lengths: Sequence[int], row_length: int, example: int = 0,
                  ) -> Optional[tuple[list[int], list[Placement]]]:
    """First-fit placement of one example's sequences into rows with ``free`` room left.

    The example goes whole into the first row with room for all its sequences; if none has
    (or it is longer than a row), each sequence goes first-fit on its own. Returns the rows'
    room afterwards and the placements, or None when some sequence finds no room (``free``
    is never modified).
    """
    trial = list(free)
    mine: list[Placement] = []
    total = sum(seq_lengths)
    row = _first_fit(trial, total) if total <= row_length else None
    for k, n in enumerate(seq_lengths):
        r = row if row is not None else _first_fit(trial, n)
        if r is None:
            return None
        mine.append(Placement(example, k, r, row_length - trial[r], n))
        trial[r] -= n
    return trial, mine


def fits_empty_rows(seq_lengths: Sequence[int], row_length: int, num_rows: int) -> bool:
    """Whether one example's sequences fit ``num_rows`` empty rows of ``row_length`` (first-fit,
    as :func:`pack_sequences` places them). One that does not can never be packed."""
    if any(n > row_length for n in seq_lengths):
        return False
    return place_example([row_length] * num_rows, seq_lengths, row_length) is not None


def _check_row_fit(e: int, seq_lengths: Sequence[int], row_length: int) -> None:
    if any(n > row_length for n in seq_lengths):
        raise PackingOverflow(
            f"example {e} has a sequence of {max(seq_lengths)} tokens, longer than a packed row ({row_length})"
        )


def pack_sequences(
    lengths: Sequence[Sequence[int]], row_length: int, num_rows: int, overflow: str = "error"
) -> tuple[list[Placement], list[int]]:
    """Place every example's sequences (``lengths[e][k]`` tokens) into ``num_rows`` rows.

    Returns (placements, examples left out); each example is placed by :func:`place_example`.
    With ``overflow="error"`` an example that does not fit raises :class:`PackingOverflow`.
    """
    free = [row_length] * num_rows
    placements: list[Placement] = []
    left_out: list[int] = []
    for e, seq_lengths in enumerate(lengths):
        _check_row_fit(e, seq_lengths, row_length)
        placed = place_example(free, seq_lengths, row_length, e)
        if placed is None:
            if overflow == "error":
                used = sum(row_length - f for f in free)
                raise PackingOverflow(
                    f"example {e} ({list(seq_lengths)} tokens) does not fit in {num_rows} packed rows of "
                    f"{row_length} ({used} slots used): raise pack_rows or row_length, lower the batch size, "
                    f"or set pack_overflow='drop'"
                )
            left_out.append(e)
            continue
        free, mine = placed
        placements.extend(mine)
    return placements, left_out


class RowFiller:
    """Grows a batch example by example while it still fits ``num_rows`` packed rows.

    The batches of ``fill_packed_rows``: :meth:`take` places the next example first-fit, as
    :func:`pack_sequences` will when the batch is built, if it fits, and keeps room for the filler
    examples (``filler_length`` tokens per sequence) that complete the batch to
    ``batch_size`` slots: fillers need rows too, so that no response is empty. Equal-sized
    filler sequences fit exactly when the rows' room holds that many of them.
    """

    def __init__(self, row_length: int, num_rows: int, batch_size: int, num_responses: int,
                 filler_length: int = 2):
        self.row_length, self.num_rows, self.batch_size = row_length, num_rows, batch_size
        self.num_responses, self.filler_length = num_responses, filler_length
        self.reset()

    def reset(self) -> None:
        self.free = [self.row_length] * self.num_rows
        self.count = 0

    def _placed(self, seq_lengths: Sequence[int]) -> Optional[list[int]]:
        if self.count >= self.batch_size:
            return None
        placed = place_example(self.free, seq_lengths, self.row_length)
        if placed is None:
            return None
        free = placed[0]
        fillers_left = (self.batch_size - self.count - 1) * self.num_responses
        if sum(room // self.filler_length for room in free) < fillers_left:
            return None
        return free

    def take(self, seq_lengths: Sequence[int]) -> bool:
        """Adds the example if it fits and says whether it did (nothing changes when it does not)."""
        free = self._placed(seq_lengths)
        if free is None:
            return False
        self.free = free
        self.count += 1
        return True


class PaddingStats:
    """Thread-safe totals of row slots: real tokens, filler-example tokens, padding."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {
            "batches": 0,
            "slots": 0,
            "real_tokens": 0,
            "filler_tokens": 0,
            "pad_tokens": 0,
            "real_examples": 0,
            "filler_examples": 0,
            "pack_dropped": 0,
        }

    def add_batch(self, batch: Batch, pack_dropped: int = 0) -> None:
        counts = batch_padding(batch)
        with self._lock:
            self._counts["batches"] += 1
            self._counts["pack_dropped"] += pack_dropped
            for key, value in counts.items():
                self._counts[key] += value

    def as_dict(self) -> dict[str, float]:
        """Totals plus ``padding_waste`` (fraction of slots that are padding or filler)."""
        with self._lock:
            counts: dict[str, float] = dict(self._counts)
        counts["padding_waste"] = (counts["pad_tokens"] + counts["filler_tokens"]) / max(counts["slots"], 1)
        return counts


def batch_padding(batch: Batch) -> dict[str, int]:
    """Slot counts of one numpy prefjax.batch.Batch."""
    segments = np.asarray(batch.segments)
    example_id = np.asarray(batch.example_id)
    weight = np.asarray(batch.weight)
    occupied = segments > 0
    filler_example = weight[np.clip(example_id, 0, None)] == 0
    filler = occupied & filler_example
    return {
        "slots": int(segments.size),
        "pad_tokens": int((~occupied).sum()),
        "filler_tokens": int(filler.sum()),
        "real_tokens": int((occupied & ~filler_example).sum()),
        "real_examples": int((weight > 0).sum()),
        "filler_examples": int((weight == 0).sum()),
    }
