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
6. Batch ``batch_size`` examples per process (:func:`prefjax.data.batching.build_batch`;
   rated examples give scores [B, L], their L ratings, ``Pipeline.rating_labels`` names them);
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

Nothing hangs on data that filters everything out. Stage 5 drops examples (truncation with a
``drop`` mode, ``on_error="drop"``, and, with ``pack_overflow="drop"``, an example that fits
the packed rows not even alone), and grain skips dropped elements internally: on repeated
data with every example dropped it would search forever. So stage 5 counts, per pass over the
data, how many examples of this process's share it has seen and kept; a share read to its end
with nothing kept raises :class:`PipelineEmptyError` with the counts by reason. An empty
source raises it at construction, with what loading skipped when the source tells
(``summary`` / ``load_summary``).

Checkpointing: the iterator is a grain ``DatasetIterator``; save it with orbax through
``grain.checkpoint.CheckpointSave(iterator)`` in an ``ocp.args.Composite`` (restore with
``CheckpointRestore(fresh_iterator)``), or use ``get_state``/``set_state`` directly.
"""

from __future__ import annotations

import collections
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
from prefjax.data.packing import LayoutConfig, PaddingStats, RowFiller, fits_empty_rows
from prefjax.data.tokenize import (
    PreprocessError,
    RenderOptions,
    TokenizedExample,
    check_example,
    rating_names,
    response_fields,
    tokenize_example,
)
from prefjax.data.truncation import TruncationConfig, TruncationCounter, truncate_example
from prefjax.models.tokenizer import Tokenizer

ERROR_MODES = ("error", "drop")

# Why stage 5 dropped an example: truncation's reasons, a tokenization error under
# on_error="drop", or an example that fits no empty set of packed rows (pack_overflow="drop").
PREPROCESS_ERROR, PACK_UNFITTABLE = "preprocess_error", "pack_unfittable"


class PipelineEmptyError(ValueError):
    """The data yields no example to train on: the source is empty, or one whole pass over it
    (this process's share) was dropped. ``counts``: dropped examples by reason."""

    def __init__(self, message: str, counts: Optional[Mapping[str, int]] = None):
        super().__init__(message)
        self.counts = dict(counts or {})


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
        self._pack_unfittable = 0
        self.first_error: Optional[str] = None
        self.label_flips = 0
        self.label_noise_examples = 0

    def add_error(self, message: str = "") -> None:
        with self._lock:
            self._errors += 1
            if self.first_error is None and message:
                self.first_error = message

    def add_pack_unfittable(self) -> None:
        with self._lock:
            self._pack_unfittable += 1

    def as_dict(self) -> dict[str, float]:
        out = {f"truncation/{k}": v for k, v in self.truncation.as_dict().items()}
        out.update({f"padding/{k}": v for k, v in self.padding.as_dict().items()})
        with self._lock:
            out["errors_dropped"] = self._errors
            out["pack_unfittable_dropped"] = self._pack_unfittable
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
    """(index, canonical example) -> truncated TokenizedExample, or None when dropped; every
    outcome is recorded in the pass check."""

    def __init__(self, tokenizer: Tokenizer, config: DataConfig, stats: PipelineStats, passes: "_PassCheck"):
        self.tokenizer = tokenizer
        self.config = config
        self.stats = stats
        self.passes = passes

    def __call__(self, index: int, example: Mapping[str, Any]) -> Optional[TokenizedExample]:
        kept, reason = self.process(example)
        self.passes.record(index, reason)
        return kept

    def process(self, example: Mapping[str, Any]) -> tuple[Optional[TokenizedExample], Optional[str]]:
        """(the example ready to batch or None, why it was dropped or None)."""
        try:
            tokenized = tokenize_example(example, self.tokenizer, self.config.render)
        except PreprocessError as err:
            if self.config.pipeline.on_error == "error":
                raise
            self.stats.add_error(str(err))
            return None, PREPROCESS_ERROR
        kept, event = truncate_example(tokenized, self.config.truncation, self.tokenizer.bos_token_id)
        self.stats.truncation.add(event)
        if kept is None:
            return None, event.dropped
        layout = self.config.layout
        if layout.pack and layout.pack_overflow == "drop":
            lengths = [kept.sequence_length(k) for k in range(kept.num_responses)]
            if not fits_empty_rows(lengths, layout.packed_row_length, layout.pack_rows):
                # Left to the batch stage it would take a slot in every batch it lands in and
                # never be placed; here it is dropped once, counted, and the pass check sees it.
                self.stats.add_pack_unfittable()
                return None, PACK_UNFITTABLE
        return kept, None


class _PassCheck:
    """Counts stage 5's outcomes per pass over the data; raises PipelineEmptyError when this
    process's share of a pass is read to its end and nothing was kept.

    grain's ``map_with_index`` index i of the sharded stream is position
    ``shard_index + i * shard_count`` of the repeated, shuffled data, whose pass is
    ``position // num_examples``. Threads finish examples out of order, so outcomes are
    counted per pass, not as a run of consecutive drops (a shuffled pass may put its one
    surviving example first and the next pass last).
    """

    def __init__(self, num_examples: int, shard_index: int, shard_count: int,
                 describe: Callable[[int, Mapping[str, int]], str]):
        self.num_examples, self.shard_index, self.shard_count = num_examples, shard_index, shard_count
        self.describe = describe
        self._passes: dict[int, collections.Counter] = {}
        self._lock = threading.Lock()

    def _share_before(self, position: int) -> int:
        """Positions in [0, position) that this process reads."""
        return max(0, -(-(position - self.shard_index) // self.shard_count))

    def share(self, epoch: int) -> int:
        """How many examples of pass `epoch` this process reads."""
        start = epoch * self.num_examples
        return self._share_before(start + self.num_examples) - self._share_before(start)

    def record(self, index: int, reason: Optional[str]) -> None:
        epoch = (self.shard_index + index * self.shard_count) // self.num_examples
        with self._lock:
            counts = self._passes.setdefault(epoch, collections.Counter())
            counts[reason or "kept"] += 1
            if sum(counts.values()) < self.share(epoch):
                return
            del self._passes[epoch]  # complete; a restore mid-pass never completes that pass here
        if not counts["kept"]:
            raise PipelineEmptyError(self.describe(sum(counts.values()), counts), counts)


class _MakeBatch:
    """grain batch_fn: a list of TokenizedExamples -> a Batch (filler-completed)."""

    def __init__(self, config: DataConfig, kind: str, num_responses: int, pad_id: int, stats: PipelineStats,
                 num_scores: int | None = None):
        self.config, self.kind, self.num_responses, self.pad_id, self.stats = (
            config,
            kind,
            num_responses,
            pad_id,
            stats,
        )
        self.num_scores = num_scores  # scores per example (rated: L); fixed, so filler-only batches agree

    def __call__(self, examples: Sequence[TokenizedExample]) -> Batch:
        batch, left_out = build_batch(
            examples,
            self.config.pipeline.batch_size,
            self.num_responses,
            self.config.layout,
            self.pad_id,
            self.kind,
            self.num_scores,
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
        loaded = load_summary(source)
        raise PipelineEmptyError("the data source holds no examples"
                                 + (f" ({loaded})" if loaded else "") + "; nothing to train on")
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
        # Rated data: the attributes (scores [B, L] columns), fixed for every batch; with none given,
        # the first example's names (HelpSteer2 rows: its five attributes).
        self.rating_labels: tuple[str, ...] = ()
        if self.kind == "rated":
            self.rating_labels = config.render.rating_labels or rating_names(source[0]["ratings"])
            config = dataclasses.replace(
                config, render=dataclasses.replace(config.render, rating_labels=self.rating_labels))
            self.config = config
        self.num_scores = len(self.rating_labels) if self.kind == "rated" else self.num_responses
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
        self.source = source
        passes = _PassCheck(self.num_examples, self.shard_index, self.shard_count, self._describe_empty)
        ds = ds.map_with_index(_Preprocess(tokenizer, config, self.stats_counters, passes))
        iter_ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=pc.read_threads, prefetch_buffer_size=pc.read_buffer)
        )
        make_batch = _MakeBatch(config, self.kind, self.num_responses, self.pad_id, self.stats_counters,
                                self.num_scores)
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
        if self.kind in ("ranked", "rated"):
            raise ValueError(f"label_noise is defined for pair and unpaired data, not {self.kind}")
        seed = pc.seed if pc.label_noise_seed is None else pc.label_noise_seed
        flips = choose_flips(self.num_examples, pc.label_noise, seed)
        self.stats_counters.label_flips = int(flips.sum())
        self.stats_counters.label_noise_examples = self.num_examples
        return flips

    def _describe_empty(self, seen: int, counts: Mapping[str, int]) -> str:
        """PipelineEmptyError's message: the examples of one pass, all dropped, by reason."""
        where = ("one pass over the data" if self.shard_count == 1 else
                 f"process {self.shard_index}'s share of one pass over the data ({self.num_examples} in all)")
        reasons = "; ".join(f"{counts[r]} {self._reason_text(r)}" for r in sorted(counts) if r != "kept")
        return (f"no example survives preprocessing: all {seen} examples of {where} were dropped: {reasons}. "
                "Nothing to train on: relax these limits or fix the data")

    def _reason_text(self, reason: str) -> str:
        t, layout = self.config.truncation, self.config.layout
        texts = {
            "prompt_too_long": f"with a prompt over max_prompt_len={t.max_prompt_len} (prompt_mode='drop')",
            "response_too_long": f"with a response over max_response_len={t.max_response_len} (response_mode='drop')",
            "sequence_too_long": (f"with prompt + response over max_len={t.max_len} (response_mode="
                                  f"{t.response_mode!r}; a prompt of max_len tokens leaves no room)"),
            "no_scored": "whose cut response kept no scored token",
            PREPROCESS_ERROR: (f"that could not be tokenized (on_error='drop'; the first: "
                               f"{self.stats_counters.first_error})"),
            PACK_UNFITTABLE: (f"that fit no {layout.pack_rows} empty packed rows of {layout.packed_row_length} "
                              "tokens (pack_overflow='drop'): raise pack_rows or row_length"),
        }
        return texts.get(reason, reason)

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)

    def stats(self) -> dict[str, float]:
        """Counters so far (see the module docstring for what they count)."""
        return self.stats_counters.as_dict()

    def to_global(self, batch: Batch, mesh: Mesh, rules: Optional[sharding_lib.Rules] = None) -> Batch:
        """`Batch.to_global` with this pipeline's pad id."""
        return batch.to_global(mesh, rules, self.pad_id)


def load_summary(source: Any) -> Any:
    """What loading the source skipped, if it says: a records.LoadSummary (``summary`` of file
    sources) or a dict (``load_summary`` of TFDS sources); None otherwise."""
    for name in ("load_summary", "summary"):
        value = getattr(source, name, None)
        if value:
            return value
    return None


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
