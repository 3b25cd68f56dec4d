"""The one batch type: token rows plus per-example columns, as a typed pytree.

Everything that moves a batch (the data pipeline, the trainer's loop, the reference
cache, the quick start's scorer, tests and benchmarks) passes a `Batch`:

    rows [R, T]:  tokens, positions, segments (0 = padding), loss_mask (1 on scored
                  tokens), example_id, response_id (-1 on padding and shared prefixes),
                  branches (layout "shared_prefix" only: 0 on the prefix, k + 1 on response k)
    columns [B]:  weight (0 = filler), scores [B, K] (rated batches, K = 1: [B, L], the
                  response's L attribute ratings, NaN = not rated), margin, label,
                  ref_logps [B, K] (only when a precomputed reference is attached);
                  online batches (prefjax.online) also carry sampler_logps [B, K] (log-prob of
                  each sample under the policy that drew it: the previous iterate) and
                  origin [B, K] (ORIGIN_*: who drew it)

Its static part, `num_responses` (K) and `layout`, travels as pytree metadata, so a
jitted function reads them at trace time and a change recompiles. Layouts:

- "unpacked": R = K * B and row k * B + b holds response k of example b, so
  `tokens.reshape(K, B, T)` works;
- "packed": several sequences per row, told apart by segment ids; a response is
  found by its (example_id, response_id) slot;
- "shared_prefix": each example's prompt once, then all its responses
  (prefjax.data.prefix_sharing), optionally packed several examples to a row;
  reduced by slot like packed rows.

Leaves are numpy arrays for one process's slice (what the pipeline yields) or global
jax.Arrays on a mesh (`to_global`). `process_slice` cuts one process's block out of a
global unpacked batch, and `microbatches` cuts the leading micro-batch axis of
gradient accumulation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np

from prefjax import sharding as sharding_lib

Array = Any  # numpy or jax arrays
LAYOUTS = ("unpacked", "packed", "shared_prefix")
ROW_FIELDS = ("tokens", "positions", "segments", "loss_mask", "example_id", "response_id", "branches")
COLUMN_FIELDS = ("weight", "scores", "margin", "label", "ref_logps", "sampler_logps", "origin")
# Batch.origin values: who produced each response of an online batch.
ORIGIN_DATA, ORIGIN_POLICY, ORIGIN_REFERENCE, ORIGIN_MIXTURE = -1.0, 0.0, 1.0, 2.0
# What each row field holds on padding (also its value where nothing is written), and its dtype.
_ROW_FILL = {"positions": 0, "segments": 0, "loss_mask": 0.0, "example_id": -1, "response_id": -1, "branches": 0}
_ROW_DTYPES = {"tokens": np.int32, "loss_mask": np.float32}


def empty_rows(num_rows: int, length: int, pad_id: int, branches: bool = False) -> dict[str, np.ndarray]:
    """Padding-only row fields [num_rows, length] to write sequences into (`branches` for
    prefix-shared rows)."""
    fill = dict(_ROW_FILL, tokens=pad_id)
    names = ROW_FIELDS if branches else ROW_FIELDS[:-1]
    return {name: np.full((num_rows, length), fill[name], _ROW_DTYPES.get(name, np.int32)) for name in names}


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of preference data (module docstring); frozen, use `replace` to change a field."""

    tokens: Array
    positions: Array
    segments: Array
    loss_mask: Array
    example_id: Array
    response_id: Array
    weight: Array
    scores: Array
    margin: Array
    label: Array
    branches: Optional[Array] = None
    ref_logps: Optional[Array] = None
    sampler_logps: Optional[Array] = None
    origin: Optional[Array] = None
    num_responses: int = 2
    layout: str = "unpacked"

    def __post_init__(self) -> None:
        # Only static fields are checked: JAX rebuilds pytrees with placeholder leaves.
        if self.layout not in LAYOUTS:
            raise ValueError(f"Batch.layout={self.layout!r}; choose one of {LAYOUTS}")

    # -- shape ---------------------------------------------------------------------------------

    @property
    def num_examples(self) -> int:
        return self.weight.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @property
    def by_slot(self) -> bool:
        """Whether responses are found by (example_id, response_id) slots rather than by row."""
        return self.layout != "unpacked"

    def rows(self) -> dict[str, Array]:
        """The [R, T] fields that are present."""
        return {name: getattr(self, name) for name in ROW_FIELDS if getattr(self, name) is not None}

    def columns(self) -> dict[str, Array]:
        """The per-example fields that are present."""
        return {name: getattr(self, name) for name in COLUMN_FIELDS if getattr(self, name) is not None}

    def replace(self, **fields: Any) -> "Batch":
        return dataclasses.replace(self, **fields)

    def map(self, fn: Any) -> "Batch":
        """`fn` applied to every array (e.g. jnp.asarray, np.asarray)."""
        return jax.tree.map(fn, self)

    # -- per-process slices and global arrays --------------------------------------------------

    def process_slice(self, count: int, index: int) -> "Batch":
        """Process `index`'s block of `count` of a global unpacked batch, in the local layout."""
        if count == 1:
            return self
        if self.layout != "unpacked":
            raise ValueError(f"process_slice cuts unpacked batches; this one is {self.layout!r}")
        b = self.num_examples
        local = b // count
        examples = np.arange(index * local, (index + 1) * local)
        rows = np.concatenate([k * b + examples for k in range(self.num_responses)])
        sliced = {name: value[rows] for name, value in self.rows().items()}
        sliced.update({name: value[examples] for name, value in self.columns().items()})
        ids = sliced["example_id"]
        sliced["example_id"] = np.where(ids >= 0, ids - index * local, ids).astype(np.int32)
        return self.replace(**sliced)

    def pad_length(self, length: int, pad_id: int) -> "Batch":
        """The batch with its rows padded on the right to `length` (processes agreeing on T)."""
        current = self.length
        if length < current:
            raise ValueError(f"Batch.pad_length: cannot shorten rows of {current} to {length}")
        if length == current:
            return self
        fill = dict(_ROW_FILL, tokens=pad_id)
        return self.replace(**{name: np.pad(value, ((0, 0), (0, length - current)), constant_values=fill[name])
                               for name, value in self.rows().items()})

    def shardings(self, mesh: jax.sharding.Mesh, rules: Optional[sharding_lib.Rules] = None,
                  process_count: int = 1) -> "Batch":
        """A NamedSharding per field: the leading axis over the "batch" logical axis.

        `process_count` > 1 describes the global arrays that per-process slices of this
        batch's shape make up.
        """
        def one(value: Array) -> jax.sharding.NamedSharding:
            global_shape = (value.shape[0] * process_count,) + tuple(value.shape[1:])
            logical = ("batch",) + (None,) * (len(global_shape) - 1)
            return sharding_lib.named_sharding(mesh, logical, global_shape, rules)

        return jax.tree.map(one, self)

    def to_global(self, mesh: jax.sharding.Mesh, rules: Optional[sharding_lib.Rules] = None,
                  pad_id: int = 0) -> "Batch":
        """This process's numpy slice -> global jax.Arrays, the leading axis over "batch".

        Every process passes its own slice and holds block i of the global batch (on meshes
        from `sharding.make_mesh`, i = process_index): global example b = i * B_local +
        b_local, and `example_id` is offset to match. Unpacked rows are then reordered so
        the global layout keeps row k * B + b = response k of example b
        (`processes_to_global_rows`). Multi-process runs first agree on the row length (a
        small all-gather). An array too small to split over the batch devices (e.g. weight
        [B] with B below the device count) is all-gathered and replicated instead.
        """
        process_count, process_index = jax.process_count(), jax.process_index()
        local = self.map(np.asarray)
        if process_count == 1:
            shardings = local.shardings(mesh, rules)
            return jax.tree.map(lambda value, named: jax.make_array_from_process_local_data(named, value),
                                local, shardings)

        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        lengths = multihost_utils.process_allgather(np.asarray(local.length, np.int32))
        local = local.pad_length(int(np.max(lengths)), pad_id)
        shardings = local.shardings(mesh, rules, process_count)
        block = process_index
        token_rows = _addressed_rows(shardings.tokens, (local.tokens.shape[0] * process_count,) + local.tokens.shape[1:])
        if len(token_rows) == local.tokens.shape[0]:
            block = token_rows[0] // len(token_rows)
        ids = local.example_id
        local = local.replace(example_id=np.where(ids >= 0, ids + block * local.num_examples, ids).astype(np.int32))

        def place(path: Any, value: np.ndarray, named: jax.sharding.NamedSharding) -> jax.Array:
            global_shape = (value.shape[0] * process_count,) + value.shape[1:]
            rows = _addressed_rows(named, global_shape)
            mine = list(range(block * value.shape[0], (block + 1) * value.shape[0]))
            if rows == mine:
                return jax.make_array_from_process_local_data(named, value, global_shape)
            if len(rows) == global_shape[0] and block == process_index:
                # Not split across processes: every process needs the whole array (gathered in process order).
                full = np.asarray(multihost_utils.process_allgather(value, tiled=True))
                return jax.make_array_from_process_local_data(named, full, global_shape)
            raise ValueError(
                f"Batch.to_global: {jax.tree_util.keystr(path)} of global shape {global_shape} on sharding "
                f"{named.spec}: process {process_index} addresses rows {rows[:4]}..., not one contiguous block "
                f"of {value.shape[0]}; build the mesh with prefjax.sharding.make_mesh (process-ordered devices)")

        out = jax.tree_util.tree_map_with_path(place, local, shardings)
        if self.layout == "unpacked":
            reorder = jax.jit(lambda x: processes_to_global_rows(x, process_count, self.num_responses),
                              out_shardings=out.tokens.sharding)
            out = out.replace(**{name: reorder(value) for name, value in out.rows().items()})
        return out

    # -- gradient accumulation -----------------------------------------------------------------

    def microbatches(self, count: int) -> "Batch":
        """A leading micro-batch axis A = `count` on every field (unpacked batches only).

        Rows k * B + b become, in micro-batch a, rows k * (B / A) + b' with
        b = a * (B / A) + b', so every micro-batch keeps the unpacked layout.
        """
        if self.layout != "unpacked":
            raise ValueError(f"micro-batches are cut from unpacked batches; this one is {self.layout!r}")
        a, k = count, self.num_responses

        def rows(value: Array) -> Array:
            r, t = value.shape
            return value.reshape(k, a, r // (k * a), t).transpose(1, 0, 2, 3).reshape(a, r // a, t)

        def columns(value: Array) -> Array:
            return value.reshape((a, value.shape[0] // a) + value.shape[1:])

        return self.replace(**{name: rows(v) for name, v in self.rows().items()},
                            **{name: columns(v) for name, v in self.columns().items()})

    def microbatch(self, index: int) -> "Batch":
        """Micro-batch `index` of a batch that `microbatches` split."""
        return jax.tree.map(lambda x: x[index], self)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_sequences(cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], length: int,
                       pad_id: int) -> "Batch":
        """Single-response rows prompt + response, right-padded to `length` (weight 1, label 1).

        The response tokens (an EOS included where the caller appended one) are scored; a
        row longer than `length` is an error naming it.
        """
        return cls.from_responses(prompts, [[r] for r in responses], length, pad_id)

    @classmethod
    def from_responses(cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[Sequence[int]]],
                       length: int, pad_id: int) -> "Batch":
        """Unpacked rows for B prompts with K responses each (`responses[b][k]`): row k * B + b is
        prompt b + its response k, right-padded to `length` (weight 1, label 1, no scores).

        The response tokens are scored; a row longer than `length` is an error naming it.
        """
        b = len(prompts)
        k = len(responses[0]) if b else 1
        if any(len(r) != k for r in responses):
            raise ValueError(f"Batch.from_responses: every prompt needs the same number of responses ({k})")
        tokens = np.full((k * b, length), pad_id, np.int32)
        loss_mask = np.zeros((k * b, length), np.float32)
        segments = np.zeros((k * b, length), np.int32)
        for j in range(k):
            for i, (p, rs) in enumerate(zip(prompts, responses)):
                r, row = rs[j], j * b + i
                n = len(p) + len(r)
                if n > length:
                    raise ValueError(f"row {row} (example {i}, response {j}): prompt ({len(p)}) + response "
                                     f"({len(r)}) tokens exceed the row length {length}")
                tokens[row, :n] = list(p) + list(r)
                loss_mask[row, len(p):n] = 1.0
                segments[row, :n] = 1
        live = segments > 0
        example = np.tile(np.arange(b, dtype=np.int32), k)[:, None]
        response = np.repeat(np.arange(k, dtype=np.int32), b)[:, None]
        return cls(tokens=tokens,
                   positions=np.broadcast_to(np.arange(length, dtype=np.int32), (k * b, length)).copy(),
                   segments=segments, loss_mask=loss_mask,
                   example_id=np.where(live, example, -1).astype(np.int32),
                   response_id=np.where(live, response, -1).astype(np.int32), weight=np.ones(b, np.float32),
                   scores=np.full((b, k), np.nan, np.float32), margin=np.full(b, np.nan, np.float32),
                   label=np.ones(b, np.float32), num_responses=k)


jax.tree_util.register_dataclass(
    Batch, data_fields=list(ROW_FIELDS[:-1] + COLUMN_FIELDS[:4] + ("branches", "ref_logps", "sampler_logps", "origin")),
    meta_fields=["num_responses", "layout"])


def _addressed_rows(named: jax.sharding.NamedSharding, global_shape: tuple[int, ...]) -> list[int]:
    """Leading-axis indices that this process's devices hold."""
    rows: set[int] = set()
    for index in named.addressable_devices_indices_map(global_shape).values():
        rows.update(range(*index[0].indices(global_shape[0])))
    return sorted(rows)


def processes_to_global_rows(rows: Any, process_count: int, num_responses: int) -> Any:
    """Unpacked rows stacked process by process -> the global layout (row k * B + b = example b, response k).

    `rows` [P * K * Bl, ...] holds process p's local rows k * Bl + bl at p * K * Bl; the global
    example index is b = p * Bl + bl. Works on numpy and jax arrays (in jit it is one
    all-to-all). Identity for one process.
    """
    if process_count == 1:
        return rows
    local_batch = rows.shape[0] // (process_count * num_responses)
    rest = rows.shape[1:]
    grouped = rows.reshape((process_count, num_responses, local_batch) + rest)
    order = (1, 0, 2) + tuple(range(3, grouped.ndim))
    return grouped.transpose(order).reshape((process_count * num_responses * local_batch,) + rest)
