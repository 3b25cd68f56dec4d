"""Tokenized examples -> a prefjax.batch.Batch (numpy, one process's slice).

    batch = build_batch(examples, batch_size=8, num_responses=2, layout=LayoutConfig(max_len=512),
                        pad_id=tokenizer.pad_token_id)

Fields and shapes (B = ``batch_size`` examples, K = responses per example, R rows of T):
tokens / positions / segments / example_id / response_id int32 [R, T], loss_mask float32
[R, T], weight / margin / label float32 [B], scores float32 [B, K]. Rated examples (one
response and L ratings each) make K = 1 and scores [B, L] (``num_scores`` = L; NaN = not
rated).

Unpacked (``layout.pack`` False): R = K * B and row ``k * B + b`` holds response k of example
b (prompt + response), so ``tokens.reshape(K, B, T)`` works; T is the bucket of the longest
sequence. Packed: R = ``layout.pack_rows``, T = ``layout.packed_row_length``, sequences placed
by :func:`prefjax.data.packing.pack_sequences`.

Fewer than B examples (end of data) are completed with **filler examples**: weight 0, scores
(ratings too) and margin nan, label 0, and two tokens per sequence (a pad-token prompt and a pad-token
response with loss_mask 1). The one scored token keeps every response non-empty, so losses
that divide by response length never see 0/0 (a nan times weight 0 is still nan).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from prefjax.batch import Batch, empty_rows
from prefjax.data.packing import LayoutConfig, RowFiller, bucket_length, pack_sequences
from prefjax.data.tokenize import TokenizedExample


def filler_example(kind: str, num_responses: int, pad_id: int,
                   num_scores: int | None = None) -> TokenizedExample:
    """A weight-0 example of two tokens per sequence (see the module docstring); ``num_scores``
    NaN scores (default: one per response)."""
    return TokenizedExample(
        kind=kind,
        prompt_ids=np.asarray([pad_id], np.int32),
        response_ids=[np.asarray([pad_id], np.int32) for _ in range(num_responses)],
        response_masks=[np.ones(1, np.int8) for _ in range(num_responses)],
        weight=0.0,
        scores=(math.nan,) * (num_responses if num_scores is None else num_scores),
        margin=math.nan,
        label=0.0,
        source="<filler>",
    )


def _check_uniform(examples: Sequence[TokenizedExample], kind: Optional[str], num_responses: int,
                   num_scores: int) -> None:
    for ex in examples:
        if ex.num_responses != num_responses or (kind is not None and ex.kind != kind):
            raise ValueError(
                f"{ex.source}: a batch needs examples of one kind with {num_responses} responses "
                f"each (kind {kind!r}); this example is {ex.kind!r} with {ex.num_responses}"
            )
        if len(ex.scores) != num_scores:
            raise ValueError(f"{ex.source}: a batch needs {num_scores} scores per example (ratings of one set of "
                             f"attributes); this example has {len(ex.scores)}")


def _write(
    rows: dict[str, np.ndarray], row: int, start: int, segment: int, example: TokenizedExample, b: int, k: int
) -> None:
    ids, mask = example.sequence(k)
    span = slice(start, start + len(ids))
    rows["tokens"][row, span] = ids
    rows["positions"][row, span] = np.arange(len(ids), dtype=np.int32)
    rows["segments"][row, span] = segment
    rows["loss_mask"][row, span] = mask
    rows["example_id"][row, span] = b
    rows["response_id"][row, span] = k


def build_batch(
    examples: Sequence[TokenizedExample],
    batch_size: int,
    num_responses: int,
    layout: LayoutConfig,
    pad_id: int,
    kind: Optional[str] = None,
    num_scores: int | None = None,
) -> tuple[Batch, int]:
    """(the Batch, number of examples left out by packing overflow) for up to ``batch_size`` examples.

    ``num_scores``: the width of ``scores``, L for rated examples; default: the examples' (K when
    there are none). Pass it where a batch may hold only fillers (the pipeline does).
    """
    if len(examples) > batch_size:
        raise ValueError(f"build_batch: {len(examples)} examples for a batch of {batch_size}")
    if num_scores is None:
        num_scores = len(examples[0].scores) if examples else num_responses
    _check_uniform(examples, kind, num_responses, num_scores)
    kind = kind or (examples[0].kind if examples else "pair")
    filler = filler_example(kind, num_responses, pad_id, num_scores)
    slots = list(examples) + [filler] * (batch_size - len(examples))
    left_out: list[int] = []
    if layout.pack:
        lengths = [[ex.sequence_length(k) for k in range(num_responses)] for ex in slots]
        placements, left_out = pack_sequences(
            lengths, layout.packed_row_length, layout.pack_rows, layout.pack_overflow
        )
        rows = empty_rows(layout.pack_rows, layout.packed_row_length, pad_id)
        segment_count = [0] * layout.pack_rows
        for p in placements:
            segment_count[p.row] += 1
            _write(rows, p.row, p.start, segment_count[p.row], slots[p.example], p.example, p.response)
    else:
        longest = max(ex.sequence_length(k) for ex in slots for k in range(num_responses))
        length = bucket_length(longest, layout.max_len, layout.buckets, layout.min_bucket)
        rows = empty_rows(num_responses * batch_size, length, pad_id)
        for b, ex in enumerate(slots):
            for k in range(num_responses):
                _write(rows, k * batch_size + b, 0, 1, ex, b, k)
    weight = np.asarray([ex.weight for ex in slots], np.float32)
    weight[left_out] = 0.0  # dropped by packing overflow: in no row, so it must not count
    batch = Batch(**rows, weight=weight,
                  scores=np.asarray([ex.scores for ex in slots], np.float32).reshape(batch_size, num_scores),
                  margin=np.asarray([ex.margin for ex in slots], np.float32),
                  label=np.asarray([ex.label for ex in slots], np.float32),
                  num_responses=num_responses, layout="packed" if layout.pack else "unpacked")
    return batch, len(left_out)


def row_filler(layout: LayoutConfig, batch_size: int, num_responses: int, kind: str = "pair",
               pad_id: int = 0) -> RowFiller:
    """The RowFiller of ``fill_packed_rows`` batches: ``layout``'s packed rows, ``batch_size``
    example slots, room kept for this batch kind's filler examples."""
    if not layout.pack:
        raise ValueError("batches that fill packed rows need a packed layout")
    filler = filler_example(kind, num_responses, pad_id)
    return RowFiller(layout.packed_row_length, layout.pack_rows, batch_size, num_responses,
                     max(filler.sequence_length(k) for k in range(num_responses)))


def fill_groups(examples: Sequence[TokenizedExample], layout: LayoutConfig, batch_size: int,
                num_responses: int, pad_id: int = 0) -> list[list[TokenizedExample]]:
    """The examples, in order, in the groups that ``fill_packed_rows`` batches hold: each takes
    examples until the next would not fit ``layout``'s packed rows (keeping room for the fillers
    that complete it to ``batch_size``), at most ``batch_size``. An example that fits no empty
    batch forms a group alone (build_batch then raises or drops it). The pipeline makes the same
    groups one at a time (prefjax.data.pipeline, with resumable state)."""
    rows = row_filler(layout, batch_size, num_responses, examples[0].kind if examples else "pair", pad_id)
    groups: list[list[TokenizedExample]] = []
    group: list[TokenizedExample] = []
    for example in examples:
        lengths = [example.sequence_length(k) for k in range(num_responses)]
        if rows.take(lengths):
            group.append(example)
            continue
        if group:  # the next group starts with this example
            groups.append(group)
            rows.reset()
            if rows.take(lengths):
                group = [example]
                continue
        groups.append([example])  # too long even alone: a group of its own
        group = []
        rows.reset()
    if group:
        groups.append(group)
    return groups
