"""Batches and a tiny model for the scoring and step tests, built by hand (independent of the data pipeline)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from prefjax import models, scoring
from prefjax.batch import Batch
from prefjax.data import synthetic_batches

# One layer, GQA, a 64-token vocabulary: compiles fast, exercises every code path.
CFG = models.get_preset("llama2-tiny", num_layers=1, hidden_size=32, intermediate_size=64, vocab_size=64,
                        num_heads=2, num_kv_heads=1)


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0):
    """(graphdef, params) of CFG."""
    return models.init_params(CFG, seed=seed)


def tiny_scorer() -> scoring.Model:
    return scoring.Model(CFG, tiny_model()[0])


def random_batch(kind: str, k: int, b: int = 4, t: int = 16, seed: int = 0) -> Batch:
    """Random unpacked rows for CFG's vocabulary, as jax arrays."""
    return synthetic_batches.random_batch(b, k, t, CFG.vocab_size, seed=seed, kind=kind).map(jnp.asarray)


def pack_pairs(batch: Batch) -> Batch:
    """An unpacked batch's rows two to a packed row (consecutive rows as segments 1 and 2)."""
    tokens = np.asarray(batch.tokens)
    r, t = tokens.shape
    b = r // batch.num_responses
    live = np.asarray(batch.segments) > 0
    rows = {key: [] for key in ("tokens", "positions", "segments", "loss_mask", "example_id", "response_id")}
    for start in range(0, r, 2):
        out = {key: np.zeros(2 * t, np.float32 if key == "loss_mask" else np.int32) for key in rows}
        out["example_id"][:] = -1
        out["response_id"][:] = -1
        offset = 0
        for seg, row in enumerate((start, start + 1), start=1):
            n = int(live[row].sum())
            sl = slice(offset, offset + n)
            out["tokens"][sl] = tokens[row][:n]
            out["positions"][sl] = np.arange(n)
            out["segments"][sl] = seg
            out["loss_mask"][sl] = np.asarray(batch.loss_mask)[row][:n]
            out["example_id"][sl] = row % b
            out["response_id"][sl] = row // b
            offset += n
        for key in rows:
            rows[key].append(out[key])
    return batch.replace(**{key: jnp.asarray(np.stack(v)) for key, v in rows.items()}, layout="packed")
