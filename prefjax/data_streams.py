"""Where the trainer's batches come from: the data pipeline, or synthetic random rows.

Both streams yield this process's numpy slice of the global batch (the data
contract of prefjax.data.batching) and turn it into global arrays on the mesh.
Their position is part of every checkpoint: the grain iterator's state for
the pipeline (saved by the Checkpointer), a batch counter for the synthetic
stream (saved in the checkpoint metadata), so a resumed run sees exactly the
batches an uninterrupted run would have seen next.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from prefjax import synthetic_batches
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import prefix_sharing
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
        self.packed = False
        self.shared_prefix = False
        self.grain_iterator = None

    def __iter__(self) -> "SyntheticStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self.position >= self.num_batches:
            raise StopIteration
        index = self.position % self.pool if self.pool else self.position
        seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        self.position += 1
        count, index = jax.process_count(), jax.process_index()
        full = synthetic_batches.random_batch(self.batch_size * count, self.num_responses, self.length,
                                              self.vocab_size, seed=seed, kind=self.kind, fill=0.9)
        return process_slice(full, self.num_responses, count, index)

    def state(self) -> dict[str, Any]:
        return {"synthetic_position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        self.position = int(state.get("synthetic_position", 0))


class PipelineStream:
    """Batches of a prefjax.data Pipeline; its grain iterator carries the position."""

    def __init__(self, pipeline: pipeline_lib.Pipeline):
        self.pipeline = pipeline
        self.grain_iterator = iter(pipeline)
        self.num_responses = pipeline.num_responses
        self.pad_id = pipeline.pad_id
        self.packed = pipeline.config.layout.pack
        self.shared_prefix = False

    def __iter__(self) -> "PipelineStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self.grain_iterator)

    def state(self) -> dict[str, Any]:
        return {}  # the Checkpointer saves grain_iterator itself

    def restore(self, state: dict[str, Any]) -> None:
        del state

    def close(self) -> None:
        close = getattr(self.grain_iterator, "close", None)
        if close is not None:
            close()


class SharedPrefixStream:
    """Another stream's unpacked batches as prefix-shared rows (prefjax.data.prefix_sharing),
    one example per row or, with `pack_rows`, packed several to a row.

    For assembly across processes the rows behave like packed ones (example ids
    offset per process), hence `packed`.
    """

    def __init__(self, inner: Any, multiple: int = 64, pack_rows: Optional[int] = None,
                 row_length: Optional[int] = None, overflow: str = "error"):
        self.inner, self.multiple = inner, multiple
        self.pack_rows, self.row_length, self.overflow = pack_rows, row_length, overflow
        self.num_responses, self.pad_id = inner.num_responses, inner.pad_id
        self.grain_iterator = inner.grain_iterator
        self.packed = True
        self.shared_prefix = True

    def __iter__(self) -> "SharedPrefixStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return prefix_sharing.share_prefixes(next(self.inner), self.num_responses, self.multiple, self.pad_id,
                                             self.pack_rows, self.row_length, self.overflow)

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.inner.restore(state)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def process_slice(batch: dict[str, np.ndarray], num_responses: int, count: int, index: int,
                  ) -> dict[str, np.ndarray]:
    """Process `index`'s block of an unpacked global batch, in the local unpacked layout."""
    if count == 1:
        return batch
    b = batch["weight"].shape[0]
    local = b // count
    examples = np.arange(index * local, (index + 1) * local)
    rows = np.concatenate([k * b + examples for k in range(num_responses)])
    out = {}
    for key, value in batch.items():
        if value.shape[0] == b and key not in ("tokens", "positions", "segments", "loss_mask", "example_id",
                                                "response_id"):
            out[key] = value[examples]
        else:
            out[key] = value[rows]
    ids = out["example_id"]
    out["example_id"] = np.where(ids >= 0, ids - index * local, ids).astype(np.int32)
    return out


def to_global(stream: Any, batch: dict[str, np.ndarray], mesh: Mesh, rules: Any = None) -> dict[str, jax.Array]:
    return pipeline_lib.make_global_batch(batch, mesh, num_responses=stream.num_responses, packed=stream.packed,
                                          pad_id=stream.pad_id, rules=rules)


def data_config(data: ml_collections.ConfigDict, *, per_process_batch: int, seed: int,
                num_epochs: Optional[int], shuffle: bool) -> pipeline_lib.DataConfig:
    """The pipeline's DataConfig from the trainer's `config.data` section (unpacked rows when
    data.share_prefix packs: SharedPrefixStream packs the shared rows itself)."""
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
    if config.data.share_prefix:
        # Rows rounded to multiples of the bucket step (64 by default): few distinct shapes to compile.
        multiple = config.data.buckets if isinstance(config.data.buckets, int) else 64
        if config.data.pack:
            return SharedPrefixStream(stream, multiple=multiple, pack_rows=config.data.pack_rows,
                                      row_length=config.data.row_length or config.data.max_len,
                                      overflow=config.data.pack_overflow)
        return SharedPrefixStream(stream, multiple=multiple)
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
