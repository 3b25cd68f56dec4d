"""The precomputed reference: one pass writes reference log-probs, every later step reads them.

With `reference.kind="precomputed"` (prefjax.roles) the reference model runs once over
the training data (and the held-out data, when there is any) before the first step;
its per-response log-prob sums are stored in `<workdir>/reference_cache/<fingerprint>/`,
keyed by a hash of each example's token content (prompt + responses and their loss
masks), so the lookup does not depend on shuffling, epochs, batch size or process
count. The fingerprint hashes what the values depend on (the model source, the
reference dtype, the data source and its preprocessing), so a resumed run or a later
run with the same model and data reuses the cache, and a changed setting computes a
new one. Each process writes the part it computed; every process reads all parts.

The train step then needs no reference weights at all: `attach_to(source, cache)` is a
batch source that attaches `ref_logps` [B, K] to every batch of the source it wraps.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from prefjax import scoring
from prefjax.batch import Batch
from prefjax.data import hub as data_hub
from prefjax.data import sources, streams
from prefjax.models import hub
from prefjax.train.batch_source import BatchSource

logger = logging.getLogger(__name__)
KEY_BYTES = 16


def example_keys(batch: Batch) -> list[bytes]:
    """A content hash per example of an unpacked numpy batch (row k * B + b = response k of b)."""
    b = batch.num_examples
    keys = []
    for i in range(b):
        h = hashlib.sha256()
        for k in range(batch.num_responses):
            row = k * b + i
            live = batch.segments[row] > 0
            h.update(np.ascontiguousarray(batch.tokens[row][live], np.int32).tobytes())
            h.update(np.ascontiguousarray(batch.loss_mask[row][live] > 0).tobytes())
            h.update(b"|")
        keys.append(h.digest()[:KEY_BYTES])
    return keys


def fingerprint(config: ml_collections.ConfigDict, train: bool = True) -> str:
    """Hash of everything the cached values of the training (or held-out) data depend on."""
    m, d = config.model, config.data
    data = {k: d[k] for k in ("source", "tokenizer", "max_len", "pack", "buckets", "max_prompt_len",
                              "max_response_len", "prompt_mode", "response_mode", "label_noise", "num_responses",
                              "split", "format")}
    data["fields"] = {k: v for k, v in d.fields.items() if v}
    # Hub ids by the commit they resolved to, not the moving branch name (prefjax.models.hub / data.hub).
    if d.tokenizer:
        data["tokenizer"] = hub.identity(d.tokenizer, key="data.tokenizer", weights=False)
    what = {
        "model": hub.identity(m.hf_folder) if m.hf_folder else {"preset": m.preset, "seed": config.seed},
        "param_dtype": m.param_dtype, "dtype": m.dtype, "reference_dtype": config.reference.dtype,
        "data": data,
        "synthetic_steps": config.total_steps if d.source == "synthetic" else None,
        "loss_kind": config.loss_name if d.source == "synthetic" else None,
    }
    if not train:  # the held-out data: its own source, read once
        data["source"], data["split"] = d.eval_source, d.eval_split
    if str(data["source"]).startswith(sources.HUB_PREFIX):
        data["source"] = data_hub.identity(data["source"], data["split"],
                                           key="data.source" if train else "data.eval_source")
        what.update(held_out=True, synthetic_steps=config.eval_batches if d.eval_source == "synthetic" else None,
                    loss_kind=config.loss_name if d.eval_source == "synthetic" else None)
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ReferenceCache:
    """Reference log-prob sums [K] by example content hash."""

    def __init__(self, table: dict[bytes, np.ndarray], num_responses: int, directory: Path):
        self.table, self.num_responses, self.directory = table, num_responses, directory

    def attach(self, batch: Batch) -> Batch:
        """The batch with `ref_logps` [B, K]; filler examples (weight 0) get zeros."""
        keys = example_keys(batch)
        values = np.zeros((len(keys), self.num_responses), np.float32)
        for i, key in enumerate(keys):
            if batch.weight[i] <= 0:
                continue
            if key not in self.table:
                raise KeyError(f"{self.directory}: example {i} of this batch has no cached reference log-probs; "
                               "the data or its preprocessing changed since the cache was written "
                               "(delete the folder to recompute)")
            values[i] = self.table[key]
        return batch.replace(ref_logps=values)


def attach_to(source: BatchSource, cache: ReferenceCache) -> BatchSource:
    """`source`'s batches with the cached reference log-probs attached (its position unchanged)."""
    return streams.MappedStream(source, cache.attach)


def prepare(config: ml_collections.ConfigDict, setup: Any, workdir: Path, mesh: Mesh, rules: Any, *,
            kind: str, train: bool = True) -> ReferenceCache:
    """Loads the cache of the training (or held-out) data for this config, computing it first if
    any part is missing. `setup` is prefjax.train.setup.Setup (its initial params are the
    reference's weights)."""
    directory = workdir / "reference_cache" / fingerprint(config, train)
    count, index = jax.process_count(), jax.process_index()
    part = directory / f"part-{index:05d}-of-{count:05d}.npz"
    have_all = all((directory / f"part-{i:05d}-of-{count:05d}.npz").is_file() for i in range(count))
    if not have_all:
        logger.info("computing reference log-probs into %s", directory)
        keys, values, k = _compute(config, setup, mesh, rules, kind, train)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = part.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), KEY_BYTES),
                 values=np.asarray(values, np.float32).reshape(len(keys), k))
        tmp.rename(part)  # a killed pass leaves no part that looks complete
        multihost_utils.sync_global_devices("prefjax.train.reference_cache.prepare")
    table: dict[bytes, np.ndarray] = {}
    k = None
    for path in sorted(directory.glob("part-*.npz")):
        with np.load(path) as f:
            k = f["values"].shape[1]
            for key, value in zip(f["keys"], f["values"]):
                table[key.tobytes()] = value
    return ReferenceCache(table, k or 2, directory)


def _compute(config: ml_collections.ConfigDict, setup: Any, mesh: Mesh, rules: Any, kind: str, train: bool,
             ) -> tuple[list[bytes], list[np.ndarray], int]:
    one_pass = ml_collections.ConfigDict(config.to_dict())
    one_pass.data.num_epochs = 1
    one_pass.data.shuffle = False
    source = config.data.source if train else config.data.eval_source
    stream = streams.make_stream(one_pass, source, kind=kind, vocab_size=setup.model_cfg.vocab_size,
                                 tokenizer=setup.tokenizer, train=train)
    if isinstance(stream, streams.SyntheticStream) and train:
        stream.num_batches = config.total_steps  # the batches the run will see
    params = setup.initial_params
    if config.reference.dtype:
        params = jax.tree.map(lambda x: x.astype(config.reference.dtype), params)
    model = setup.model

    @jax.jit
    def reference_sums(p, batch):
        return scoring.score(model, p, batch).logps.astype(jnp.float32)

    keys, values = [], []
    for local in stream:
        batch = local.to_global(mesh, rules, stream.pad_id)
        sums = reference_sums(params, batch)
        full = np.asarray(multihost_utils.process_allgather(sums, tiled=True)) if jax.process_count() > 1 \
            else np.asarray(sums)
        b = local.num_examples
        block = jax.process_index()
        mine = full[block * b:(block + 1) * b] if full.shape[0] > b else full
        for key, value, w in zip(example_keys(local), mine, local.weight):
            if w > 0:
                keys.append(key)
                values.append(value)
    stream.close()
    return keys, values, stream.num_responses
