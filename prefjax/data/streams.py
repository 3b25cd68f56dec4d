"""The trainer's dataset streams: the data pipeline, prefix-shared rows, or synthetic random rows.

Each stream is a batch source of the training loop (prefjax.train.batch_source): it
yields this process's numpy slice of the global batch (a prefjax.batch.Batch) and
knows its pad id for assembling global arrays. Its position is part of every
checkpoint: the grain iterator's state for the pipeline (`data_iterator`, saved by
the Checkpointer), a batch counter for the synthetic stream (`state()`, saved in
the checkpoint metadata), so a resumed run sees exactly the batches an
uninterrupted run would have seen next.

Real data comes from `prefjax.data.sources.load_source` with the `config.data` keys (split /
eval_split, data_dir, format, fields, on_error). `data.on_error="skip"` (or its older name
"drop") skips bad rows (counted by reason in the source's `LoadSummary`, which every stream
exposes as `load_summary`) and drops examples that cannot be tokenized. A loss that trains on
unpaired examples (KTO, BCO, ...) reads pair data as two unpaired examples per pair
(`UnpairedFromPairs`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from prefjax.batch import Batch
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import prefix_sharing, records, synthetic_batches
from prefjax.data.records import LoadSummary
from prefjax.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# What each kind of loss reads, for the error on data of another kind.
_NEEDS = {"pair": "pairs (prompt + chosen + rejected)",
          "unpaired": "unpaired examples (prompt + completion + label), or pairs (each becomes a desirable "
                      "and an undesirable example)",
          "ranked": "ranked examples (prompt + responses + scores or ranks)",
          "rated": "rated examples (prompt + response + ratings, or HelpSteer2 rows)"}


class SyntheticStream:
    """Random token batches; global batch i is seeded by (seed, i), and each process takes its slice,
    so a run sees the same data whatever its process count."""

    def __init__(self, *, batch_size: int, num_responses: int, length: int, vocab_size: int, kind: str,
                 seed: int, num_batches: Optional[int] = None, pool: int = 0,
                 num_scores: int | None = None):
        self.pool = pool  # > 0: cycle through this many distinct batches (learnable; smoke runs)
        self.batch_size, self.num_responses, self.length = batch_size, num_responses, length
        self.vocab_size, self.kind, self.seed = vocab_size, kind, seed
        self.num_scores = num_scores  # rated batches: L ratings per example
        self.num_batches = num_batches
        self.position = 0
        self.pad_id = 0
        self.data_iterator = None
        self.load_summary: Optional[LoadSummary] = None  # no rows were read

    def __iter__(self) -> "SyntheticStream":
        return self

    def __next__(self) -> Batch:
        if self.num_batches is not None and self.position >= self.num_batches:
            raise StopIteration
        index = self.position % self.pool if self.pool else self.position
        seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        self.position += 1
        count, index = jax.process_count(), jax.process_index()
        full = synthetic_batches.random_batch(self.batch_size * count, self.num_responses, self.length,
                                              self.vocab_size, seed=seed, kind=self.kind, fill=0.9,
                                              num_scores=self.num_scores)
        return full.process_slice(count, index)

    def state(self) -> dict[str, Any]:
        return {"synthetic_position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        self.position = int(state.get("synthetic_position", 0))

    def close(self) -> None:
        pass


class PipelineStream:
    """Batches of a prefjax.data Pipeline; its grain iterator carries the position.

    `load_summary`: what reading the source's rows gave (rows, examples, skipped rows by reason and
    the first message per reason, the row format), or None when the source did not record it.
    """

    def __init__(self, pipeline: pipeline_lib.Pipeline, load_summary: Optional[LoadSummary] = None):
        self.pipeline = pipeline
        self.load_summary = load_summary
        self.data_iterator = iter(pipeline)
        self.num_responses = pipeline.num_responses
        self.pad_id = pipeline.pad_id
        self.rating_labels = pipeline.rating_labels  # rated data: the names of scores' L columns

    def __iter__(self) -> "PipelineStream":
        return self

    def __next__(self) -> Batch:
        return next(self.data_iterator)

    def state(self) -> dict[str, Any]:
        return {}  # the Checkpointer saves data_iterator itself

    def restore(self, state: dict[str, Any]) -> None:
        del state

    def close(self) -> None:
        close = getattr(self.data_iterator, "close", None)
        if close is not None:
            close()


class MappedStream:
    """Another stream's batches, each passed through `fn`; the position is the inner stream's.

    Prefix-shared rows (`fn` = prefjax.data.prefix_sharing.share_prefixes) and the precomputed
    reference's log-probs (prefjax.train.reference_cache) are such maps.
    """

    def __init__(self, inner: Any, fn: Callable[[Batch], Batch]):
        self.inner, self.fn = inner, fn
        self.num_responses, self.pad_id = inner.num_responses, inner.pad_id
        self.data_iterator = inner.data_iterator
        self.load_summary = getattr(inner, "load_summary", None)

    def __iter__(self) -> "MappedStream":
        return self

    def __next__(self) -> Batch:
        return self.fn(next(self.inner))

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.inner.restore(state)

    def close(self) -> None:
        self.inner.close()


class UnpairedFromPairs:
    """A pair source read as unpaired examples: pair i gives example 2i (its chosen response,
    desirable) and 2i + 1 (its rejected response, undesirable), TRL's convention for KTO-style
    losses on paired data. Random access like the pair source (grain shuffles and resumes it)."""

    kind = "unpaired"

    def __init__(self, pairs: Any):
        self.pairs = pairs

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = operator.index(index)
        position += len(self) if position < 0 else 0
        if not 0 <= position < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return records.pair_to_unpaired(self.pairs[position // 2], desirable=position % 2 == 0)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"UnpairedFromPairs({self.pairs!r})"


def pipeline_on_error(on_error: str) -> str:
    """data.on_error -> the pipeline's policy for examples that cannot be tokenized."""
    return "error" if records.row_policy(on_error) == "raise" else "drop"


def data_config(data: ml_collections.ConfigDict, *, per_process_batch: int, seed: int,
                num_epochs: Optional[int], shuffle: bool) -> pipeline_lib.DataConfig:
    """The pipeline's DataConfig from the trainer's `config.data` section (unpacked rows when
    data.share_prefix packs: the prefix-shared rows are packed by prefix_sharing itself)."""
    pack = data.pack and not data.share_prefix
    mapping = dict(batch_size=per_process_batch, max_len=data.max_len, pack=pack, buckets=data.buckets,
                   seed=seed, shuffle=shuffle, num_epochs=num_epochs, label_noise=data.label_noise,
                   on_error=pipeline_on_error(data.on_error), prompt_mode=data.prompt_mode,
                   response_mode=data.response_mode)
    if pack:
        mapping.update(pack_rows=data.pack_rows, row_length=data.row_length, pack_overflow=data.pack_overflow,
                       fill_packed_rows=data.fill_rows)
    if data.max_prompt_len is not None:
        mapping["max_prompt_len"] = data.max_prompt_len
    if data.max_response_len is not None:
        mapping["max_response_len"] = data.max_response_len
    return pipeline_lib.DataConfig.from_mapping(mapping)


def make_stream(config: ml_collections.ConfigDict, source_spec: str, *, kind: str, vocab_size: int,
                tokenizer: Optional[Tokenizer], train: bool) -> Any:
    """A SyntheticStream or PipelineStream for `source_spec` (train or eval data), prefix-shared when
    data.share_prefix is set."""
    stream = _unpacked_or_packed_stream(config, source_spec, kind=kind, vocab_size=vocab_size,
                                        tokenizer=tokenizer, train=train)
    data = config.data
    if data.share_prefix:
        # Rows rounded to multiples of the bucket step (64 by default): few distinct shapes to compile.
        share = functools.partial(prefix_sharing.share_prefixes,
                                  multiple=data.buckets if isinstance(data.buckets, int) else 64, pad_id=stream.pad_id)
        if data.pack:  # the examples' blocks packed several to a row
            share = functools.partial(share, pack_rows=data.pack_rows, row_length=data.row_length or data.max_len,
                                      overflow=data.pack_overflow)
        return MappedStream(stream, share)
    return stream


def _unpacked_or_packed_stream(config: ml_collections.ConfigDict, source_spec: str, *, kind: str,
                               vocab_size: int, tokenizer: Optional[Tokenizer], train: bool) -> Any:
    data = config.data
    per_process = data.batch_size // jax.process_count()
    if source_spec == "synthetic":
        k = {"pair": 2, "unpaired": 1, "rated": 1}.get(kind, data.num_responses)
        return SyntheticStream(batch_size=per_process, num_responses=k, length=data.max_len,
                               vocab_size=vocab_size, kind=kind, seed=config.seed + (0 if train else 10_007),
                               num_batches=None if train else config.eval_batches,
                               pool=data.synthetic_pool if train else 0,
                               num_scores=config.reward.num_labels if kind == "rated" else None)
    if tokenizer is None:
        raise ValueError(f"data.source={source_spec!r} needs a tokenizer: set model.hf_folder or data.tokenizer")
    source, summary = load_examples(config, source_spec, kind=kind, train=train)
    cfg = data_config(data, per_process_batch=per_process, seed=config.seed,
                      num_epochs=data.num_epochs if train else 1, shuffle=data.shuffle and train)
    if kind == "rated":
        cfg = dataclasses.replace(cfg, render=dataclasses.replace(cfg.render,
                                                                  rating_labels=tuple(config.reward.labels)))
    pipeline = pipeline_lib.Pipeline(source, tokenizer, cfg)
    if kind == "rated":
        _check_rating_labels(pipeline.rating_labels, config, "data.source" if train else "data.eval_source",
                             source_spec)
    return PipelineStream(pipeline, load_summary=summary)


def _check_rating_labels(labels: Sequence[str], config: ml_collections.ConfigDict, key: str, spec: str) -> None:
    """The data's attributes (reward.labels, or the first example's names) must be one per reward output."""
    n = config.reward.num_labels
    if len(labels) != n:
        raise DataKindError(f"{key}={spec!r} rates {len(labels)} attributes {list(labels)}, but reward.num_labels="
                            f"{n}: set reward.num_labels={len(labels)}, or reward.labels to the {n} attributes to "
                            "train on")


class DataKindError(ValueError):
    """The data holds another kind of example (pairs, unpaired, ranked) than the loss trains on."""


def _load_summary(source: Any) -> Optional[LoadSummary]:
    """The source's LoadSummary: a file/Hub source's `summary`, a TFDS source's stored one."""
    summary = getattr(source, "summary", None)
    if isinstance(summary, LoadSummary):
        return summary
    stored = getattr(source, "load_summary", None)  # recorded when the TFDS dataset was prepared
    return LoadSummary.from_dict(stored) if stored else None


def load_examples(config: ml_collections.ConfigDict, source_spec: str, *, kind: str,
                  train: bool) -> tuple[Any, Optional[LoadSummary]]:
    """The random-access examples of `source_spec` as the config's data section says to read them,
    in the kind the loss trains on (pairs become unpaired examples for unpaired losses), and what
    reading them gave. Train data reads data.split, eval data data.eval_split."""
    from prefjax.data import sources  # pylint: disable=import-outside-toplevel

    data = config.data
    key = "data.source" if train else "data.eval_source"
    source = sources.load_source(
        source_spec, split=data.split if train else data.eval_split, data_dir=data.data_dir or None,
        fields={name: column for name, column in data.fields.items() if column}, row_format=data.format,
        on_error=records.row_policy(data.on_error), key=key)
    summary = _load_summary(source)
    if summary is not None and summary.num_skipped and not isinstance(source, sources.ListSource):
        # File and Hub rows were reported as they were read (prefjax.data.readers); a prepared
        # dataset's were reported when it was prepared, maybe long ago.
        log.warning("%s=%r: %s", key, source_spec, summary)
    if not len(source):
        return source, summary  # the pipeline says it is empty, with what loading skipped
    source_kind = getattr(source, "kind", None) or source[0]["kind"]
    if source_kind == "pair" and kind == "unpaired":
        pairs, source = len(source), UnpairedFromPairs(source)
        log.warning("data: %d pairs -> %d unpaired examples (chosen desirable, rejected undesirable) for "
                    "loss %r", pairs, len(source), config.loss_name)
    elif source_kind != kind:
        raise DataKindError(f"{key}={source_spec!r} holds {source_kind} examples, but loss {config.loss_name!r} "
                         f"trains on {_NEEDS[kind]}")
    return source, summary
