"""Seeded label-flip injection for robustness experiments (robust DPO, cDPO).

Preference-noise studies train on data where a known fraction of pairs has
chosen and rejected swapped. This module makes that corruption exact and
reproducible:

  * `choose_flips` picks exactly round(rate * n) pairs by a seeded permutation
    (numpy, so the data pipeline can apply the same flips to raw examples);
  * `flip_pairs` swaps chosen <-> rejected in every paired field of a
    `PairLogps` for the flagged rows (`jnp.where`, so it works under jit);
  * `inject_label_noise` does both and reports which rows flipped.

The permutation is drawn once per (n, seed) and the first k indices flip, so
for one seed the pairs flipped at a lower rate are a subset of those flipped
at a higher rate: a noise-rate sweep corrupts nested sets of pairs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.losses.types import PairLogps

Array = jax.Array

# (chosen-side field, rejected-side field) pairs that describe the two responses.
# Deliberately absent: `margin` (a per-pair strength; a flipped label models an
# annotator who picked the wrong side, not a different strength, so it is kept),
# `gold`/`gold_len` (a third response, unaffected) and `weight`.
PAIRED_FIELDS = (
    ("chosen", "rejected"),
    ("ref_chosen", "ref_rejected"),
    ("chosen_len", "rejected_len"),
    ("chosen_token_logps", "rejected_token_logps"),
    ("chosen_token_kl", "rejected_token_kl"),
    ("chosen_mask", "rejected_mask"),
    ("score_chosen", "score_rejected"),
)


def num_flips(num_pairs: int, rate: float) -> int:
    """round(rate * num_pairs), rounding halves up (Python's round() rounds them to even)."""
    return int(math.floor(rate * num_pairs + 0.5))


def choose_flips(num_pairs: int, rate: float, seed: int) -> np.ndarray:
    """A [num_pairs] bool mask with exactly round(rate * num_pairs) True entries.

    Deterministic in (num_pairs, rate, seed); the flipped rows are the first k
    of a permutation drawn from `np.random.default_rng(seed)`.
    """
    if num_pairs < 0:
        raise ValueError(f"choose_flips: num_pairs must be >= 0, got {num_pairs}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"choose_flips: rate must be in [0, 1], got {rate}")
    order = np.random.default_rng(seed).permutation(num_pairs)
    flips = np.zeros(num_pairs, dtype=bool)
    flips[order[: num_flips(num_pairs, rate)]] = True
    return flips


def _pad_tokens(x: Array, length: int) -> Array:
    """Right-pads a [B, T] field with zeros to [B, length] (zeros are masked out)."""
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


def _swap_rows(a: Array, b: Array, flip_B: Array) -> tuple[Array, Array]:
    """(a, b) with rows where `flip_B` is set exchanged; trailing axes broadcast."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim == 2 and b.ndim == 2 and a.shape[1] != b.shape[1]:
        # Chosen and rejected token fields may have different T; a row can only
        # move across once both have the same width.
        width = max(a.shape[1], b.shape[1])
        a, b = _pad_tokens(a, width), _pad_tokens(b, width)
    if a.shape != b.shape:
        raise ValueError(f"flip_pairs: cannot swap fields of shapes {a.shape} and {b.shape}")
    dtype = jnp.result_type(a, b)
    a, b = a.astype(dtype), b.astype(dtype)
    flip = flip_B.reshape(flip_B.shape + (1,) * (a.ndim - 1))
    return jnp.where(flip, b, a), jnp.where(flip, a, b)


def flip_pairs(lp: PairLogps, flip_mask: Any) -> PairLogps:
    """`lp` with chosen and rejected exchanged in the rows where `flip_mask` is True.

    Every paired field is swapped (log-probs, reference log-probs, lengths,
    per-token log-probs / KL / masks, scores); `margin`, `gold`, `gold_len`
    and `weight` are left as they are. Token fields of different widths are
    zero-padded to the wider one (padding is masked out). jit-compatible:
    `flip_mask` may be a traced [B] array.
    """
    flip_B = jnp.asarray(flip_mask).astype(bool)
    batch = jnp.shape(lp.chosen)[0]
    if flip_B.shape != (batch,):
        raise ValueError(f"flip_pairs: flip_mask must have shape ({batch},), got {flip_B.shape}")
    updates: dict[str, Optional[Array]] = {}
    for chosen_name, rejected_name in PAIRED_FIELDS:
        a, b = getattr(lp, chosen_name), getattr(lp, rejected_name)
        if a is None and b is None:
            continue
        if a is None or b is None:
            missing = chosen_name if a is None else rejected_name
            raise ValueError(f"flip_pairs: field {missing!r} is None but its partner is set; cannot swap")
        updates[chosen_name], updates[rejected_name] = _swap_rows(a, b, flip_B)
    return dataclasses.replace(lp, **updates)


def inject_label_noise(lp: PairLogps, rate: float, seed: int) -> tuple[PairLogps, np.ndarray]:
    """Flips exactly round(rate * B) seeded pairs of `lp`; returns (noisy lp, [B] bool flip mask)."""
    flips = choose_flips(int(jnp.shape(lp.chosen)[0]), rate, seed)
    return flip_pairs(lp, flips), flips
