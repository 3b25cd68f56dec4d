"""Prefix-shared rows: each example's prompt once, followed by all of its responses.

In the unpacked layout (prefjax.data.batching) a pair costs two rows that both
start with the same prompt, so the policy and the reference each run the prompt
twice. Here the K rows of an example become one row

    [ shared prefix | response 0 | response 1 | ... | padding ]

with `branches` 0 on the prefix and k + 1 on response k. The model's attention
mask (prefjax.models.attention) lets a response token see the prefix and its
own response only, and the positions of a response continue from the prefix
as in its own row, so every response token gets exactly the hidden state it
had in the unpacked layout. Scoring reads each response token's prediction
from the token before it on its own branch (the last prefix token for a
branch's first token; prefjax.scoring.shared_prefix_targets).

The shared prefix of an example is the longest common prefix of its K rows,
cut before the first scored token of any of them (a scored token is never
shared). At prompt = response length a pair's tokens drop from 2(P + R) to
P + 2R: a quarter fewer at P = R.

With `pack_rows`, the examples' blocks (prefix and responses) are packed first-fit
into that many rows of `row_length` instead, several to a row, told apart by
segment ids 1, 2, ... as in packed rows: both savings at once. A response token
still finds its prefix (the last branch-0 token before it is its own block's),
and the attention mask keeps blocks apart by segment.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from prefjax.batch import Batch, empty_rows
from prefjax.data.packing import PackingOverflow, place_example


def _live_length(segments_row: np.ndarray) -> int:
    live = np.flatnonzero(segments_row > 0)
    return 0 if live.size == 0 else int(live[-1]) + 1


def _shared_length(rows: list[np.ndarray], masks: list[np.ndarray], lengths: list[int]) -> int:
    """Longest common prefix of the rows' live tokens, before any row's first scored token."""
    limit = min(lengths)
    for mask, length in zip(masks, lengths):
        scored = np.flatnonzero(mask[:length] > 0)
        if scored.size:
            limit = min(limit, int(scored[0]))
    if limit == 0:
        return 0
    same = np.all(np.stack([r[:limit] for r in rows]) == rows[0][:limit], axis=0)
    differ = np.flatnonzero(~same)
    return limit if differ.size == 0 else int(differ[0])


def share_prefixes(batch: Batch, multiple: int = 64, pad_id: int = 0, pack_rows: Optional[int] = None,
                   row_length: Optional[int] = None, overflow: str = "error") -> Batch:
    """Unpacked rows [K * B, T] (row k * B + b = response k of example b) -> prefix-shared rows [B, L].

    L is the longest shared row rounded up to `multiple`. Per-example arrays
    (weight, scores, ...) are kept; rows get `branches` besides the usual row fields
    (example_id = b on live tokens, response_id = k on response k, -1 on the prefix).
    With `pack_rows` (and `row_length`), the rows are [pack_rows, row_length] instead,
    each holding as many examples' blocks as fit; a block that finds no room raises
    PackingOverflow (`overflow="error"`) or is left out with weight 0 (`"drop"`).
    """
    if multiple < 1:
        raise ValueError(f"share_prefixes: multiple must be >= 1, got {multiple}")
    num_responses = batch.num_responses
    rows = {key: np.asarray(value) for key, value in batch.rows().items()}
    tokens = rows["tokens"]
    b = batch.num_examples
    if batch.layout != "unpacked" or tokens.shape[0] != num_responses * b:
        raise ValueError(f"share_prefixes: expected {num_responses} x {b} unpacked rows, got {tokens.shape[0]} "
                         f"in a {batch.layout!r} batch (packed batches cannot be prefix-shared)")
    pieces = []
    for example in range(b):
        row_ids = [k * b + example for k in range(num_responses)]
        lengths = [_live_length(rows["segments"][r]) for r in row_ids]
        shared = _shared_length([tokens[r] for r in row_ids], [rows["loss_mask"][r] for r in row_ids], lengths)
        parts = {key: [rows[key][row_ids[0], :shared]] for key in ("tokens", "positions", "loss_mask")}
        parts["branches"] = [np.zeros(shared, np.int32)]
        parts["response_id"] = [np.full(shared, -1, np.int32)]
        for k, r in enumerate(row_ids):
            span = slice(shared, lengths[k])
            for key in ("tokens", "positions", "loss_mask"):
                parts[key].append(rows[key][r, span])
            parts["branches"].append(np.full(lengths[k] - shared, k + 1, np.int32))
            parts["response_id"].append(np.full(lengths[k] - shared, k, np.int32))
        pieces.append({key: np.concatenate(value) for key, value in parts.items()})
    if pack_rows is None:
        longest = max((len(p["tokens"]) for p in pieces), default=0)
        num_rows, length = b, max(multiple, -(-longest // multiple) * multiple)
        places = [(example, 0, 1) for example in range(b)]  # (row, start, segment): one example per row
    else:
        if row_length is None:
            raise ValueError("share_prefixes: pack_rows needs row_length")
        num_rows, length = pack_rows, row_length
        places = _pack_blocks([len(p["tokens"]) for p in pieces], pack_rows, row_length, overflow)
    weight = np.array(batch.weight, copy=True)
    dropped = [example for example, place in enumerate(places) if place is None]
    weight[dropped] = 0.0  # in no row, so they must not count
    out = empty_rows(num_rows, length, pad_id, branches=True)
    for example, (piece, place) in enumerate(zip(pieces, places)):
        if place is None:
            continue
        row, start, segment = place
        span = slice(start, start + len(piece["tokens"]))
        for key in ("tokens", "positions", "loss_mask", "response_id", "branches"):
            out[key][row, span] = piece[key]
        out["segments"][row, span] = segment
        out["example_id"][row, span] = example
    return batch.replace(**out, weight=weight, layout="shared_prefix")


def _pack_blocks(lengths: list[int], num_rows: int, row_length: int,
                 overflow: str = "error") -> list[Optional[tuple[int, int, int]]]:
    """(row, start, segment id) of each example's block, first-fit in order (None: dropped for lack of
    room, with overflow="drop"); empty blocks take no room."""
    free, segments, places = [row_length] * num_rows, [0] * num_rows, []
    for example, n in enumerate(lengths):
        if n == 0:
            places.append((0, 0, 0))
            continue
        placed = place_example(free, [n], row_length, example) if n <= row_length else None
        if placed is None and overflow == "drop":
            places.append(None)
            continue
        if placed is None:
            raise PackingOverflow(
                f"prefix-shared example {example} ({n} tokens) does not fit in {num_rows} packed rows of "
                f"{row_length} ({sum(row_length - f for f in free)} slots used): raise data.pack_rows or "
                "data.row_length, lower the batch size, or set data.pack_overflow='drop'")
        free, (where,) = placed
        segments[where.row] += 1
        places.append((where.row, where.start, segments[where.row]))
    return places
