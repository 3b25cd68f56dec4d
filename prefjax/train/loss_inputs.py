"""A batch's scores -> the input container a registered loss takes.

One function per data shape of the loss registry: pairs (PairLogps), unpaired
feedback (UnpairedLogps), ranked lists (ListLogps), and reward-model pairs and
ratings (RewardPair, RatedResponses). Optional data columns (scores, margins,
and an online batch's sampler log-probs and response origins) are passed only
when the dataset has them (`Columns`), since filler examples and absent columns
carry NaN.

Online pair batches (prefjax.online) fill the online losses' fields: `prev_*` from
Batch.sampler_logps (log pi_t, INPO), `*_from_reference` from Batch.origin (XPO), and,
when K = 3, `sample`/`ref_sample` from the third response (HyPO's fresh policy sample).
Unpaired batches with scores get `score` = scores[:, 0] (Nash-MD's win probability).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.batch import ORIGIN_REFERENCE, Batch
from prefjax.losses import types
from prefjax.scoring import Scores

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Columns:
    """Which optional per-example columns the dataset provides (static)."""

    scores: bool = False
    margin: bool = False
    sampler_logps: bool = False
    origin: bool = False

    @classmethod
    def present_in(cls, batch: Batch) -> "Columns":
        """The columns a (numpy) batch has: any finite value among its real (weight > 0) examples."""
        live = np.asarray(batch.weight) > 0

        def has(column: Any) -> bool:
            return column is not None and bool(np.isfinite(np.asarray(column)[live]).any())

        return cls(scores=has(batch.scores), margin=has(batch.margin),
                   sampler_logps=has(batch.sampler_logps), origin=has(batch.origin))


def _finite_or_zero(x: Array) -> Array:
    return jnp.where(jnp.isfinite(x), x, 0.0)


def build(inputs_cls: type, r: Scores, batch: Batch, columns: Columns) -> Any:
    """The loss input of class `inputs_cls` for one (micro-)batch."""
    weight = batch.weight
    if inputs_cls is types.PairLogps:
        return _pairs(r, batch, columns, weight)
    if inputs_cls is types.UnpairedLogps:
        return types.UnpairedLogps(
            logps=r.logps[:, 0], label=batch.label > 0.5,
            ref_logps=None if r.ref_logps is None else r.ref_logps[:, 0], length=r.lengths[:, 0],
            kl_logps=r.kl_logps, ref_kl_logps=r.ref_kl_logps, weight=weight,
            score=_finite_or_zero(batch.scores[:, 0]) if columns.scores else None)
    if inputs_cls is types.ListLogps:
        scores = batch.scores
        return types.ListLogps(logps=r.logps, scores=_finite_or_zero(scores), ref_logps=r.ref_logps,
                               lengths=r.lengths, mask=jnp.isfinite(scores), weight=weight)
    if inputs_cls is types.RewardPair:  # one output (config_lib checks reward.num_labels == 1)
        return types.RewardPair(chosen=r.rewards[:, 0, 0], rejected=r.rewards[:, 1, 0],
                                margin=_finite_or_zero(batch.margin) if columns.margin else None,
                                weight=weight)
    if inputs_cls is types.RatedResponses:
        scores = batch.scores
        # one output: K ranked responses, scores [B, K]; L outputs: one rated response, scores [B, L]
        predicted = r.rewards[..., 0] if r.rewards.shape[-1] == 1 else r.rewards[:, 0, :]
        return types.RatedResponses(predicted=predicted, target=_finite_or_zero(scores),
                                    mask=jnp.isfinite(scores), weight=weight)
    raise TypeError(f"no batch layout for loss inputs {inputs_cls.__name__}")


def _pairs(r: Scores, batch: Batch, columns: Columns, weight: Array) -> types.PairLogps:
    fields: dict[str, Any] = dict(
        chosen=r.logps[:, 0], rejected=r.logps[:, 1],
        chosen_len=r.lengths[:, 0], rejected_len=r.lengths[:, 1],
        # Without a separate gold column, Triple-PO's gold response is the chosen one.
        gold=r.logps[:, 0], gold_len=r.lengths[:, 0],
        weight=weight,
    )
    if r.ref_logps is not None:
        fields.update(ref_chosen=r.ref_logps[:, 0], ref_rejected=r.ref_logps[:, 1])
    if r.token_logps is not None:
        fields.update(chosen_token_logps=r.token_logps[0], rejected_token_logps=r.token_logps[1],
                      chosen_mask=r.token_mask[0], rejected_mask=r.token_mask[1])
    if r.token_kl is not None:
        fields.update(chosen_token_kl=r.token_kl[0], rejected_token_kl=r.token_kl[1])
    if columns.scores:
        scores = _finite_or_zero(batch.scores)
        fields.update(score_chosen=scores[:, 0], score_rejected=scores[:, 1])
    if columns.margin:
        fields.update(margin=_finite_or_zero(batch.margin))
    fields.update(_online_pair_fields(r, batch, columns))
    return types.PairLogps(**fields)


def _online_pair_fields(r: Scores, batch: Batch, columns: Columns) -> dict[str, Array]:
    """The online losses' pair fields that this batch can fill (see the module docstring).

    Unknown values (NaN: filler examples) become 0 rather than NaN, which would reach the
    gradient through a filler example's zero weight (0 * NaN); a real example must carry
    finite values, which the online source guarantees.
    """
    fields: dict[str, Array] = {}
    if columns.sampler_logps and batch.sampler_logps is not None:
        prev = _finite_or_zero(jnp.asarray(batch.sampler_logps, jnp.float32))
        fields.update(prev_chosen=prev[:, 0], prev_rejected=prev[:, 1])
    if columns.origin and batch.origin is not None:
        from_reference = (jnp.asarray(batch.origin) == ORIGIN_REFERENCE).astype(jnp.float32)
        fields.update(chosen_from_reference=from_reference[:, 0], rejected_from_reference=from_reference[:, 1])
    if batch.num_responses == 3:  # HyPO: (chosen, rejected, a fresh policy sample)
        fields.update(sample=r.logps[:, 2])
        if r.ref_logps is not None:
            fields.update(ref_sample=r.ref_logps[:, 2])
    return fields
