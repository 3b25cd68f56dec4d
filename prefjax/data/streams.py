"""The trainer's dataset streams: the data pipeline, prefix-shared rows, or synthetic random rows.

Each stream is a batch source of the training loop (prefjax.train.batch_source): it
yields this process's numpy slice of the global batch (a prefjax.batch.Batch) and
knows its pad id for assembling global arrays. Its position is part of every
checkpoint: the grain iterator's state for the pipeline (`data_iterator`, saved by
the Checkpointer), a batch counter for the synthetic stream (`state()`, saved in
the checkpoint metadata), so a resumed run sees exactly the batches an
uninterrupted run would have seen next.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from prefjax.batch import Batch
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import prefix_sharing, synthetic_batches
from prefjax.models.tokenizer import Tokenizer


class SyntheticStream:
    """Random token batches; global batch i is seeded by (seed, i), and each process takes its slice,
    so a run sees the same data whatever its process count."""

    def __init__(self, *, batch_size: int, num_responses: int, length: int, vocab_size: int, kind: str,
                 seed: int, num_batches: Optional[int] = None, pool: int = 0):
        self.pool = pool  # > 0: cycle through this many distinct batches (learnable; smoke runs)
        self.batch_size, self.num_responses, self.length = batch_size, num_responses, length
        self.vocab_size, self.kind, self.seed = vocab_size, kind, seed
        self.num_batches = num_batches
        self.position = 0
        self.pad_id = 0
        self.data_iterator = None

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
                                              self.vocab_size, seed=seed, kind=self.kind, fill=0.9)
        return full.process_slice(count, index)

    def state(self) -> dict[str, Any]:
        return {"synthetic_position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        self.position = int(state.get("synthetic_position", 0))

    def close(self) -> None:
        pass


class PipelineStream:
    """Batches of a prefjax.data Pipeline; its grain iterator carries the position."""

    def __init__(self, pipeline: pipeline_lib.Pipeline):
        self.pipeline = pipeline
        self.data_iterator = iter(pipeline)
        self.num_responses = pipeline.num_responses
        self.pad_id = pipeline.pad_id

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


def data_config(data: ml_collections.ConfigDict, *, per_process_batch: int, seed: int,
                num_epochs: Optional[int], shuffle: bool) -> pipeline_lib.DataConfig:
    """The pipeline's DataConfig from the trainer's `config.data` section (unpacked rows when
    data.share_prefix packs: the prefix-shared rows are packed by prefix_sharing itself)."""
    pack = data.pack and not data.share_prefix
    mapping = dict(batch_size=per_process_batch, max_len=data.max_len, pack=pack, buckets=data.buckets,
                   seed=seed, shuffle=shuffle, num_epochs=num_epochs, label_noise=data.label_noise,
                   on_error=data.on_error, prompt_mode=data.prompt_mode, response_mode=data.response_mode)
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
        k = {"pair": 2, "unpaired": 1}.get(kind, data.num_responses)
        return SyntheticStream(batch_size=per_process, num_responses=k, length=data.max_len,
                               vocab_size=vocab_size, kind=kind, seed=config.seed + (0 if train else 10_007),
                               num_batches=None if train else config.eval_batches,
                               pool=data.synthetic_pool if train else 0)
    if tokenizer is None:
        raise ValueError(f"data.source={source_spec!r} needs a tokenizer: set model.hf_folder or data.tokenizer")
    from prefjax.data import sources  # pylint: disable=import-outside-toplevel

    source = sources.load_source(source_spec)
    source_kind = getattr(source, "kind", None) or (source[0]["kind"] if len(source) else kind)
    if source_kind != kind:
        raise ValueError(f"data {source_spec!r} holds {source_kind!r} examples, but loss "
                         f"{config.loss_name!r} trains on {kind!r} examples")
    cfg = data_config(data, per_process_batch=per_process, seed=config.seed,
                      num_epochs=data.num_epochs if train else 1, shuffle=data.shuffle and train)
    return PipelineStream(pipeline_lib.Pipeline(source, tokenizer, cfg))
