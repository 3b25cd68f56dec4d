"""The grain input pipeline: canonical examples -> per-process Batches -> global jax.Arrays.

    pipe = Pipeline(source, tokenizer, DataConfig.from_mapping(config.data))
    it = iter(pipe)                              # a grain DatasetIterator
    batch = next(it)                             # a numpy prefjax.batch.Batch, this process's slice
    arrays = pipe.to_global(batch, mesh)         # a Batch of jax.Arrays, leading axis over "batch"
    state = it.get_state()                       # JSON-able; it.set_state(state) resumes exactly

Stages (grain's Dataset API), in order:

1. ``MapDataset.source(source)``: any random-access source (``__len__``/``__getitem__``).
2. Label noise (optional): ``choose_flips(len(source), rate, seed)`` from
   :mod:`prefjax.data.label_noise` picks exactly round(rate * N) examples over the whole
   source (every process agrees); pairs swap chosen/rejected (and their scores), unpaired
   examples flip their label. The same examples are flipped in every epoch.
3. Seeded global shuffle, reshuffled each epoch, then ``repeat(num_epochs)`` (None: forever).
4. Per-process sharding: process ``shard_index`` of ``shard_count`` reads only positions
   ``shard_index::shard_count`` of that stream (default: ``jax.process_index()`` /
   ``jax.process_count()``; pass them, or a grain ``ShardOptions``, to simulate processes).
   Every example is read by exactly one process per epoch.
5. Tokenize + truncate (``ReadOptions.num_threads`` threads); dropped examples vanish.
6. Batch ``batch_size`` examples per process (:func:`prefjax.data.batching.build_batch`);
   a final partial batch is completed with weight-0 filler examples. With finite epochs every
   process yields the same number of batches (ceil(ceil(N * epochs / P) / B)); a process
   that runs out early (fewer examples, or more dropped) yields all-filler batches, so
   multi-process steps never hang. With ``fill_packed_rows`` (packed layouts) a batch instead
   takes examples, in order, until the next one would not fit its packed rows
   (:class:`prefjax.data.packing.RowFiller`), at most ``batch_size``: batches are formed by
   token budget (pack_rows x row_length), so short examples come many to a batch and the
   rows hold almost no padding; the number of batches then depends on the data, so finite
   epochs need one process.
7. Prefetch ``prefetch_batches`` batches in a background thread.

Counters (truncation, drops, padding waste, label flips) are in :meth:`Pipeline.stats`. They
count work when it happens in this process, so prefetching runs a few batches ahead, and they
start from zero after a restore.

Checkpointing: the iterator is a grain ``DatasetIterator``; save it with orbax through
``grain.checkpoint.CheckpointSave(iterator)`` in an ``ocp.args.Composite`` (restore with
``CheckpointRestore(fresh_iterator)``), or use ``get_state``/``set_state`` directly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from prefjax import sharding as sharding_lib
from prefjax.batch import Batch
from prefjax.data.batching import build_batch, row_filler
from prefjax.data.label_noise import choose_flips
from prefjax.data.packing import LayoutConfig, PaddingStats, RowFiller
from prefjax.data.tokenize import (
    PreprocessError,
    RenderOptions,
    TokenizedExample,
    check_example,
    response_fields,
    tokenize_example,
)
from prefjax.data.truncation import TruncationConfig, TruncationCounter, truncate
from prefjax.models.tokenizer import Tokenizer

ERROR_MODES = ("error", "drop")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Reading order and batching.

    batch_size: examples per batch per process (the global batch is batch_size * processes).
    num_epochs: passes over the data; None repeats forever.
    read_threads / read_buffer: grain ReadOptions (threads tokenizing, elements buffered).
    prefetch_batches: batches prepared ahead in a background thread (0: none).
    label_noise / label_noise_seed: fraction of examples whose preference is flipped.
    on_error: "error" raises on an example that cannot be tokenized; "drop" skips (counted).
    fill_packed_rows: with a packed layout, batches take examples until the packed rows are
      full (batch_size is then the most examples a batch can hold; module docstring, stage 6).
    """

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: Optional[int] = 1
    read_threads: int = 4
    read_buffer: int = 64
    prefetch_batches: int = 2
    label_noise: float = 0.0
    label_noise_seed: Optional[int] = None
    on_error: str = "error"
    fill_packed_rows: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"PipelineConfig.batch_size must be a positive integer, got {self.batch_size!r}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"PipelineConfig.num_epochs must be >= 1 or None, got {self.num_epochs}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"PipelineConfig.label_noise must be in [0, 1], got {self.label_noise}")
        if self.on_error not in ERROR_MODES:
            raise ValueError(f"PipelineConfig.on_error must be one of {ERROR_MODES}, got {self.on_error!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything preprocessing needs; build it from a flat mapping with :meth:`from_mapping`."""

    pipeline: PipelineConfig
    layout: LayoutConfig
    truncation: TruncationConfig = dataclasses.field(default_factory=TruncationConfig)
    render: RenderOptions = dataclasses.field(default_factory=RenderOptions)

    def __post_init__(self) -> None:
        cap = self.truncation.max_len
        if cap is None:  # sequences must fit the rows: the layout's max_len is the default limit
            object.__setattr__(
                self, "truncation", dataclasses.replace(self.truncation, max_len=self.layout.max_len)
            )
        elif cap > self.layout.max_len:
            raise ValueError(f"truncation max_len {cap} exceeds the layout's max_len {self.layout.max_len}")
        if self.pipeline.fill_packed_rows and not self.layout.pack:
            raise ValueError("fill_packed_rows needs a packed layout (pack=True with pack_rows)")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "DataConfig":
        """From one flat mapping (e.g. ``config.data``); ``max_len`` sets both row and truncation limits.

        Unknown keys raise a ValueError listing the valid ones.
        """
        values = dict(mapping.to_dict() if hasattr(mapping, "to_dict") else mapping)
        groups = {
            "pipeline": PipelineConfig,
            "layout": LayoutConfig,
            "truncation": TruncationConfig,
            "render": RenderOptions,
        }
        valid = {f.name for group in groups.values() for f in dataclasses.fields(group)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"data config: unknown keys {unknown}; valid keys are {sorted(valid)}")
        missing = [key for key in ("batch_size", "max_len") if key not in values]
        if missing:
            raise ValueError(f"data config: missing required keys {missing}")
        for key in ("end_of_turn_tokens", "buckets"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        parts = {
            name: group(**{f.name: values[f.name] for f in dataclasses.fields(group) if f.name in values})
            for name, group in groups.items()
        }
        return cls(**parts)


class PipelineStats:
    """Every counter of the pipeline, thread-safe."""

    def __init__(self) -> None:
        self.truncation = TruncationCounter()
        self.padding = PaddingStats()
        self._lock = threading.Lock()
        self._errors = 0
        self.label_flips = 0
        self.label_noise_examples = 0

    def add_error(self) -> None:
        with self._lock:
            self._errors += 1

    def as_dict(self) -> dict[str, float]:
        out = {f"truncation/{k}": v for k, v in self.truncation.as_dict().items()}
        out.update({f"padding/{k}": v for k, v in self.padding.as_dict().items()})
        with self._lock:
            out["errors_dropped"] = self._errors
        out["label_noise/flipped"] = self.label_flips
        out["label_noise/examples"] = self.label_noise_examples
        return out


# ---------------------------------------------------------------------------
# Transforms (picklable callables, so they also work in grain worker processes)
# ---------------------------------------------------------------------------


def flip_preference(example: Mapping[str, Any]) -> dict[str, Any]:
    """The example with its preference reversed: pairs swap chosen/rejected, unpaired flip the label."""
    flipped = dict(example)
    if example["kind"] == "pair":
        flipped["chosen"], flipped["rejected"] = example["rejected"], example["chosen"]
        flipped["score_chosen"] = example.get("score_rejected", math.nan)
        flipped["score_rejected"] = example.get("score_chosen", math.nan)
    elif example["kind"] == "unpaired":
        flipped["label"] = not example["label"]
    else:
        raise ValueError(
            f"{example.get('source', '?')}: label noise is defined for pair and unpaired examples, "
            f"not {example['kind']!r}"
        )
    return flipped


class _FlipLabels:
    def __init__(self, flips: np.ndarray):
        self.flips = flips

    def __call__(self, index: int, example: Mapping[str, Any]) -> Mapping[str, Any]:
        return flip_preference(example) if self.flips[index % len(self.flips)] else example


class _Preprocess:
    """Canonical example -> truncated TokenizedExample, or None when dropped."""

    def __init__(self, tokenizer: Tokenizer, config: DataConfig, stats: PipelineStats):
        self.tokenizer = tokenizer
        self.config = config
        self.stats = stats

    def __call__(self, example: Mapping[str, Any]) -> Optional[TokenizedExample]:
        try:
            tokenized = tokenize_example(example, self.tokenizer, self.config.render)
        except PreprocessError:
            if self.config.pipeline.on_error == "error":
                raise
            self.stats.add_error()
            return None
        return truncate(tokenized, self.config.truncation, self.tokenizer.bos_token_id, self.stats.truncation)


class _MakeBatch:
    """grain batch_fn: a list of TokenizedExamples -> a Batch (filler-completed)."""

    def __init__(self, config: DataConfig, kind: str, num_responses: int, pad_id: int, stats: PipelineStats):
        self.config, self.kind, self.num_responses, self.pad_id, self.stats = (
            config,
            kind,
            num_responses,
            pad_id,
            stats,
        )

    def __call__(self, examples: Sequence[TokenizedExample]) -> Batch:
        batch, left_out = build_batch(
            examples,
            self.config.pipeline.batch_size,
            self.num_responses,
            self.config.layout,
            self.pad_id,
            self.kind,
        )
        self.stats.padding.add_batch(batch, pack_dropped=left_out)
        return batch


class _PadToCountIterator(grain.DatasetIterator):
    """Yields the parent's batches, then filler batches until ``count`` batches in all."""

    def __init__(self, parent: grain.DatasetIterator, count: int, make_filler: Callable[[], Any]):
        super().__init__(parent)
        self._count = count
        self._make_filler = make_filler
        self._yielded = 0

    def __next__(self) -> Any:
        try:
            batch = next(self._parent)
        except StopIteration:
            if self._yielded >= self._count:
                raise
            batch = self._make_filler()
        self._yielded += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "yielded": self._yielded}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._yielded = state["yielded"]


class _PadToCount(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, count: int, make_filler: Callable[[], Any]):
        super().__init__(parent)
        self._count = count
        self._make_filler = make_filler

    def __iter__(self) -> _PadToCountIterator:
        return _PadToCountIterator(self._parent.__iter__(), self._count, self._make_filler)

    def __str__(self) -> str:
        return f"_PadToCount(count={self._count})"


class _FillRowsIterator(grain.DatasetIterator):
    """Lists of examples that fill the packed rows (see :class:`_FillRows`).

    The example that did not fit is held for the next batch; the saved state is the parent's
    state from before that example was read, so a restored iterator reads it again.
    """

    def __init__(self, parent: grain.DatasetIterator, filler: RowFiller):
        super().__init__(parent)
        self._filler = filler
        self._held: Optional[TokenizedExample] = None
        self._state_before_held: Any = None

    def __next__(self) -> list[TokenizedExample]:
        self._filler.reset()
        batch: list[TokenizedExample] = []
        while True:
            if self._held is not None:
                example, self._held, state = self._held, None, self._state_before_held
            else:
                state = self._parent.get_state()
                try:
                    example = next(self._parent)
                except StopIteration:
                    if batch:
                        return batch
                    raise
            lengths = [example.sequence_length(k) for k in range(example.num_responses)]
            if self._filler.take(lengths):
                batch.append(example)
            elif not batch:  # too long even alone: build_batch raises (or drops it, as configured)
                batch.append(example)
                return batch
            else:
                self._held, self._state_before_held = example, state
                return batch

    def get_state(self) -> dict[str, Any]:
        if self._held is not None:
            return {"parent": self._state_before_held}
        return {"parent": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._held = None


class _FillRows(grain.IterDataset):
    """Groups examples into batches by packed-row capacity instead of by count."""

    def __init__(self, parent: grain.IterDataset, make_filler: Callable[[], RowFiller]):
        super().__init__(parent)
        self._make_filler = make_filler

    def __iter__(self) -> _FillRowsIterator:
        return _FillRowsIterator(self._parent.__iter__(), self._make_filler())

    def __str__(self) -> str:
        return "_FillRows()"


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


def _source_shape(source: Any) -> tuple[str, int]:
    """(kind, responses per example) of the source, from its first example."""
    if len(source) == 0:
        raise ValueError("the data source is empty")
    first = source[0]
    check_example(first)
    return first["kind"], len(response_fields(first))


class Pipeline:
    """Per-process batches from a random-access source of canonical examples (module docstring)."""

    def __init__(
        self,
        source: Any,
        tokenizer: Tokenizer,
        config: DataConfig,
        *,
        shard_index: Optional[int] = None,
        shard_count: Optional[int] = None,
        shard_options: Optional[grain.sharding.ShardOptions] = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        if shard_options is not None:  # e.g. grain.sharding.ShardByJaxProcess()
            shard_index, shard_count = shard_options.shard_index, shard_options.shard_count
        self.shard_index = jax.process_index() if shard_index is None else shard_index
        self.shard_count = jax.process_count() if shard_count is None else shard_count
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} is not in [0, shard_count={self.shard_count})")
        self.kind, self.num_responses = _source_shape(source)
        self.pad_id = _pad_id(tokenizer)
        self.stats_counters = PipelineStats()
        self.num_examples = len(source)
        self.label_flips = self._label_flips()
        pc = config.pipeline

        ds = grain.MapDataset.source(source)
        if self.label_flips is not None:
            ds = ds.map_with_index(_FlipLabels(self.label_flips))
        if pc.shuffle:
            ds = ds.shuffle(seed=pc.seed)
        ds = ds.repeat(pc.num_epochs)
        ds = ds[self.shard_index :: self.shard_count]
        ds = ds.map(_Preprocess(tokenizer, config, self.stats_counters))
        iter_ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=pc.read_threads, prefetch_buffer_size=pc.read_buffer)
        )
        make_batch = _MakeBatch(config, self.kind, self.num_responses, self.pad_id, self.stats_counters)
        self.batches_per_process: Optional[int] = None
        if pc.fill_packed_rows:
            if pc.num_epochs is not None and self.shard_count > 1:
                raise ValueError("fill_packed_rows gives each process as many batches as its data fills, so "
                                 "processes would disagree on the step count: with several processes set "
                                 "num_epochs=None (repeat) and stop after a number of steps")
            make_filler = functools.partial(row_filler, config.layout, pc.batch_size, self.num_responses, self.kind,
                                            self.pad_id)
            iter_ds = _FillRows(iter_ds, make_filler).map(make_batch)
        else:
            iter_ds = iter_ds.batch(pc.batch_size, drop_remainder=False, batch_fn=make_batch)
        if pc.num_epochs is not None and not pc.fill_packed_rows:
            per_process = -(-self.num_examples * pc.num_epochs // self.shard_count)
            self.batches_per_process = -(-per_process // pc.batch_size)
            iter_ds = _PadToCount(iter_ds, self.batches_per_process, functools.partial(make_batch, []))
        if pc.prefetch_batches > 0:
            iter_ds = grain.experimental.ThreadPrefetchIterDataset(
                iter_ds, prefetch_buffer_size=pc.prefetch_batches
            )
        self.dataset: grain.IterDataset = iter_ds

    def _label_flips(self) -> Optional[np.ndarray]:
        pc = self.config.pipeline
        if pc.label_noise == 0.0:
            return None
        if self.kind == "ranked":
            raise ValueError("label_noise is defined for pair and unpaired data, not ranked")
        seed = pc.seed if pc.label_noise_seed is None else pc.label_noise_seed
        flips = choose_flips(self.num_examples, pc.label_noise, seed)
        self.stats_counters.label_flips = int(flips.sum())
        self.stats_counters.label_noise_examples = self.num_examples
        return flips

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)

    def stats(self) -> dict[str, float]:
        """Counters so far (see the module docstring for what they count)."""
        return self.stats_counters.as_dict()

    def to_global(self, batch: Batch, mesh: Mesh, rules: Optional[sharding_lib.Rules] = None) -> Batch:
        """`Batch.to_global` with this pipeline's pad id."""
        return batch.to_global(mesh, rules, self.pad_id)


def _pad_id(tokenizer: Tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def iterate_global(
    pipeline: Pipeline, mesh: Mesh, iterator: Optional[grain.DatasetIterator] = None
) -> Iterator[Batch]:
    """Global batches from ``iterator`` (default: a fresh one); keep the iterator to checkpoint it."""
    iterator = iter(pipeline) if iterator is None else iterator
    for batch in iterator:
        yield pipeline.to_global(batch, mesh)
