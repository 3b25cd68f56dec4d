"""Scoring batches: sequences grouped by length bucket, padded to fixed shapes, placed on a mesh.

    buckets = bucket_lengths(limit=512)                  # (16, 32, 64, 128, 256, 512)
    for chunk in plan([len(ids) for ids, _ in seqs], buckets, batch_size=32, multiple=8):
        batch = rows(seqs, chunk, pad_id)                # Batch [chunk.rows, chunk.length], K = 1
        batch = place(batch, mesh)                       # global arrays, rows over the "batch" axis

A jitted program compiles once per input shape. Rows are padded to the smallest bucket that
holds them (powers of two from 16, the last one capped at the limit), and every batch of a
bucket has the same number of rows (the last one is filled with copies of its last sequence,
whose scores are dropped), so scoring N sequences compiles at most one program per bucket,
whatever N and however lengths are spread.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from prefjax import sharding as sharding_lib
from prefjax.batch import Batch, empty_rows

SMALLEST_BUCKET = 16
Sequences = Sequence[tuple[np.ndarray, np.ndarray]]  # (ids [n], scored-token mask [n])


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One scoring batch: which sequences (`indices`, in input order), at which row length, in
    how many rows (>= len(indices))."""

    indices: tuple[int, ...]
    length: int
    rows: int


def bucket_lengths(limit: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
    """Row lengths to pad to: powers of two from `smallest` below `limit`, then `limit`."""
    out = []
    length = smallest
    while length < limit:
        out.append(length)
        length *= 2
    return tuple(out) + (limit,)


def batch_multiple(mesh: Mesh | None, rules: sharding_lib.Rules | None = None) -> int:
    """How many pieces the mesh cuts the rows of a batch into (rows must be a multiple of it)."""
    if mesh is None:
        return 1
    spec = sharding_lib.logical_to_spec(("batch",), (mesh.size,), mesh, rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[axis] for axis in axes)


def plan(lengths: Sequence[int], buckets: Sequence[int], batch_size: int, multiple: int = 1) -> list[Chunk]:
    """Chunks covering every sequence once: by bucket, then in input order, `batch_size` at a time.

    A bucket's chunks all have rows = min(batch_size, its sequences) rounded up to `multiple`.
    Every length must fit the largest bucket (callers check and name the offender).
    """
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        bucket = next(b for b in buckets if b >= n)
        by_bucket.setdefault(bucket, []).append(i)
    chunks = []
    for length in sorted(by_bucket):
        members = by_bucket[length]
        rows = -(-min(batch_size, len(members)) // multiple) * multiple
        for start in range(0, len(members), batch_size):
            chunks.append(Chunk(tuple(members[start:start + batch_size]), length, rows))
    return chunks


def rows(sequences: Sequences, chunk: Chunk, pad_id: int) -> Batch:
    """The chunk's sequences as unpacked single-response rows [chunk.rows, chunk.length], right-padded.

    `loss_mask` is each sequence's scored-token mask: explicit rewards are read at its last
    scored token (prefjax.scoring.last_token_positions), implicit ones sum log-probs over it.
    """
    members = list(chunk.indices) + [chunk.indices[-1]] * (chunk.rows - len(chunk.indices))
    fields = empty_rows(chunk.rows, chunk.length, pad_id)
    for r, i in enumerate(members):
        ids, mask = sequences[i]
        n = len(ids)
        fields["tokens"][r, :n] = ids
        fields["loss_mask"][r, :n] = mask
        fields["segments"][r, :n] = 1
        fields["positions"][r, :n] = np.arange(n)
        fields["example_id"][r, :n] = r
        fields["response_id"][r, :n] = 0
    b = chunk.rows
    return Batch(**fields, weight=np.ones(b, np.float32), scores=np.full((b, 1), np.nan, np.float32),
                 margin=np.full(b, np.nan, np.float32), label=np.ones(b, np.float32), num_responses=1)


def place(batch: Batch, mesh: Mesh | None, rules: sharding_lib.Rules | None = None) -> Batch:
    """The (whole, global) numpy batch on `mesh`, rows split over the "batch" logical axis.

    Every process holds the whole batch (each scores the same inputs), so each device's
    block is cut from it directly; no process needs another's data.
    """
    if mesh is None:
        return batch
    shardings = batch.shardings(mesh, rules)
    return jax.tree.map(lambda value, named: jax.make_array_from_callback(
        value.shape, named, lambda index, value=value: value[index]), batch, shardings)
