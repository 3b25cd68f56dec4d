"""The precomputed reference: one pass writes reference log-probs, every later step reads them.

With `reference.kind="precomputed"` the reference model runs once over the
training data before the first step; its per-response log-prob sums are
stored in `<workdir>/reference_cache/<fingerprint>/`, keyed by a hash of each
example's token content (prompt + responses and their loss masks), so the
lookup does not depend on shuffling, epochs, batch size or process count.
The fingerprint hashes what the values depend on (the model source, the
reference dtype, the data source and its preprocessing), so a resumed run or
a later run with the same model and data reuses the cache, and a changed
setting computes a new one. Each process writes the part it computed; every
process reads all parts.

The train step then needs no reference weights at all: batches carry
`ref_logps` [B, K].
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

from prefjax import data_streams, logprobs, models, response_logps

logger = logging.getLogger(__name__)
KEY_BYTES = 16


def example_keys(batch: dict[str, np.ndarray], num_responses: int) -> list[bytes]:
    """A content hash per example of an unpacked batch (row k * B + b = response k of b)."""
    b = batch["weight"].shape[0]
    keys = []
    for i in range(b):
        h = hashlib.sha256()
        for k in range(num_responses):
            row = k * b + i
            live = batch["segments"][row] > 0
            h.update(np.ascontiguousarray(batch["tokens"][row][live], np.int32).tobytes())
            h.update(np.ascontiguousarray(batch["loss_mask"][row][live] > 0).tobytes())
            h.update(b"|")
        keys.append(h.digest()[:KEY_BYTES])
    return keys


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """Hash of everything the cached values depend on."""
    m, d = config.model, config.data
    what = {
        "model": m.hf_folder or {"preset": m.preset, "seed": config.seed},
        "param_dtype": m.param_dtype, "dtype": m.dtype, "reference_dtype": config.reference.dtype,
        "data": {k: d[k] for k in ("source", "tokenizer", "max_len", "pack", "buckets", "max_prompt_len",
                                   "max_response_len", "prompt_mode", "response_mode", "label_noise",
                                   "num_responses")},
        "synthetic_steps": config.total_steps if d.source == "synthetic" else None,
        "loss_kind": config.loss_name if d.source == "synthetic" else None,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ReferenceCache:
    """Reference log-prob sums [K] by example content hash."""

    def __init__(self, table: dict[bytes, np.ndarray], num_responses: int, directory: Path):
        self.table, self.num_responses, self.directory = table, num_responses, directory

    def attach(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch with "ref_logps" [B, K]; filler examples (weight 0) get zeros."""
        keys = example_keys(batch, self.num_responses)
        values = np.zeros((len(keys), self.num_responses), np.float32)
        for i, key in enumerate(keys):
            if batch["weight"][i] <= 0:
                continue
            if key not in self.table:
                raise KeyError(f"{self.directory}: example {i} of this batch has no cached reference log-probs; "
                               "the data or its preprocessing changed since the cache was written "
                               "(delete the folder to recompute)")
            values[i] = self.table[key]
        return dict(batch, ref_logps=values)


def prepare(config: ml_collections.ConfigDict, setup: Any, workdir: Path, mesh: Mesh, rules: Any, *,
            kind: str) -> ReferenceCache:
    """Loads the cache for this config, computing it first if any part is missing."""
    directory = workdir / "reference_cache" / fingerprint(config)
    count, index = jax.process_count(), jax.process_index()
    part = directory / f"part-{index:05d}-of-{count:05d}.npz"
    have_all = all((directory / f"part-{i:05d}-of-{count:05d}.npz").is_file() for i in range(count))
    if not have_all:
        logger.info("computing reference log-probs into %s", directory)
        keys, values, k = _compute(config, setup, mesh, rules, kind)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = part.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), KEY_BYTES),
                 values=np.asarray(values, np.float32).reshape(len(keys), k))
        tmp.rename(part)  # a killed pass leaves no part that looks complete
        multihost_utils.sync_global_devices("prefjax.reference_cache.prepare")
    table: dict[bytes, np.ndarray] = {}
    k = None
    for path in sorted(directory.glob("part-*.npz")):
        with np.load(path) as f:
            k = f["values"].shape[1]
            for key, value in zip(f["keys"], f["values"]):
                table[key.tobytes()] = value
    return ReferenceCache(table, k or 2, directory)


def _compute(config: ml_collections.ConfigDict, setup: Any, mesh: Mesh, rules: Any, kind: str,
             ) -> tuple[list[bytes], list[np.ndarray], int]:
    one_pass = ml_collections.ConfigDict(config.to_dict())
    one_pass.data.num_epochs = 1
    one_pass.data.shuffle = False
    stream = data_streams.make_stream(one_pass, config.data.source, kind=kind, vocab_size=setup.model_cfg.vocab_size,
                                      tokenizer=setup.tokenizer, train=True)
    if isinstance(stream, data_streams.SyntheticStream):
        stream.num_batches = config.total_steps  # the batches the run will see
    params = setup.initial_params
    if config.reference.dtype:
        params = jax.tree.map(lambda x: x.astype(config.reference.dtype), params)
    graphdef, cfg, k = setup.graphdef, setup.model_cfg, stream.num_responses

    @jax.jit
    def reference_sums(p, batch):
        hidden, _ = models.apply(graphdef, p, batch["tokens"], positions_BxT=batch["positions"],
                                 segments_BxT=batch["segments"])
        labels, mask, _, _ = response_logps.shifted(batch)
        tok = logprobs.token_logps(hidden, models.unembedding(graphdef, p), labels, mask_BxT=mask,
                                   chunk_size=config.logprob_chunk, vocab_chunk_size=config.vocab_chunk,
                                   tile_tokens=config.logprob_tile_tokens,
                                   logit_softcap=cfg.final_logit_softcap)
        return response_logps.reduce_unpacked(tok, mask, k)[0].astype(jnp.float32)

    keys, values = [], []
    for local in stream:
        batch = data_streams.to_global(stream, local, mesh, rules)
        sums = reference_sums(params, batch)
        full = np.asarray(multihost_utils.process_allgather(sums, tiled=True)) if jax.process_count() > 1 \
            else np.asarray(sums)
        b = local["weight"].shape[0]
        block = jax.process_index()
        mine = full[block * b:(block + 1) * b] if full.shape[0] > b else full
        for key, value, w in zip(example_keys(local, k), mine, local["weight"]):
            if w > 0:
                keys.append(key)
                values.append(value)
    close = getattr(stream, "close", None)
    if close is not None:
        close()
    return keys, values, k
