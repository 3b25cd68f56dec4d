"""Inputs and outputs of the loss library: small pytree dataclasses of log-probs.

A loss never sees the model or the tokens. The caller (the train step, an
evaluator, a notebook) reduces the model's per-token log-probs over response
tokens and hands the loss one of the containers below. Every field is an array
whose leading axis is the batch (``B``); optional fields default to ``None``,
which is an empty pytree node, so the containers pass through ``jax.jit``,
``jax.vmap`` and ``jax.grad`` unchanged.

Conventions shared by every container:
  * log-probs are natural-log probabilities of the *response* tokens only,
    summed over those tokens (``chosen`` = log pi_theta(y_w | x));
  * ``*_len`` fields are response token counts (floats or ints, > 0);
  * ``weight`` is the caller's per-example weight (0 marks padding examples).
    Losses do not multiply by it (the caller reduces in one place), but losses
    that compute batch statistics (KTO's KL baseline, beta-DPO's gap statistics,
    BCO's reward shift) use it to leave padding examples out of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def _pytree_dataclass(cls):
    """A frozen dataclass whose fields are all pytree children."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


def _masked_sum(values_BxT: Array, mask_BxT: Array) -> Array:
    return jnp.sum(jnp.where(mask_BxT.astype(bool), values_BxT, 0.0), axis=-1)


@_pytree_dataclass
class PairLogps:
    """A batch of preference pairs (chosen y_w preferred over rejected y_l).

    Attributes:
      chosen, rejected: [B] policy log-probs, summed over response tokens.
      ref_chosen, ref_rejected: [B] the same under the frozen reference.
      chosen_len, rejected_len: [B] response token counts (length-normalised
        losses: SimPO, ORPO, IPO-style averages, R-DPO).
      chosen_token_logps, rejected_token_logps: [B, T] per-token policy
        log-probs (token-level losses), zero or arbitrary where masked out.
      chosen_token_kl, rejected_token_kl: [B, T] per-token
        KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t)) over the full vocabulary
        (TDPO); the model code computes it without materialising logits.
      chosen_mask, rejected_mask: [B, T] 1 on response tokens, 0 elsewhere.
      score_chosen, score_rejected: [B] or [B, M] per-response scores (ODPO's
        quality score, MODPO's M margin reward models).
      margin: [B] a per-pair margin or offset column.
      gold, gold_len: [B] log-prob and length of a gold response (Triple-PO).
      weight: [B] caller's per-example weight (see module docstring).
      prev_chosen, prev_rejected: [B] log pi_t of chosen / rejected under the
        previous iterate, the policy that sampled them (INPO).
      chosen_from_reference, rejected_from_reference: [B] 1.0 where that
        response was sampled from the reference, else 0.0 (XPO's exploration
        term).
      sample, ref_sample: [B] policy / reference log-prob of a fresh policy
        sample for the pair's prompt (HyPO's reverse-KL term).
    """

    chosen: Array
    rejected: Array
    ref_chosen: Optional[Array] = None
    ref_rejected: Optional[Array] = None
    chosen_len: Optional[Array] = None
    rejected_len: Optional[Array] = None
    chosen_token_logps: Optional[Array] = None
    rejected_token_logps: Optional[Array] = None
    chosen_token_kl: Optional[Array] = None
    rejected_token_kl: Optional[Array] = None
    chosen_mask: Optional[Array] = None
    rejected_mask: Optional[Array] = None
    score_chosen: Optional[Array] = None
    score_rejected: Optional[Array] = None
    margin: Optional[Array] = None
    gold: Optional[Array] = None
    gold_len: Optional[Array] = None
    weight: Optional[Array] = None
    # Online fields (prefjax.online); after `weight` so positional construction keeps its meaning.
    prev_chosen: Optional[Array] = None
    prev_rejected: Optional[Array] = None
    chosen_from_reference: Optional[Array] = None
    rejected_from_reference: Optional[Array] = None
    sample: Optional[Array] = None
    ref_sample: Optional[Array] = None

    @classmethod
    def from_token_logps(
        cls,
        chosen_token_logps: Array,
        chosen_mask: Array,
        rejected_token_logps: Array,
        rejected_mask: Array,
        *,
        ref_chosen_token_logps: Optional[Array] = None,
        ref_rejected_token_logps: Optional[Array] = None,
        **columns: Any,
    ) -> "PairLogps":
        """Builds sequence sums and lengths from [B, T] per-token log-probs.

        Masked-out positions are excluded with `where`, not multiplied, so a
        -inf or NaN at a padding position cannot leak into the sums.
        """
        ref_chosen = ref_rejected = None
        if ref_chosen_token_logps is not None:
            ref_chosen = _masked_sum(ref_chosen_token_logps, chosen_mask)
        if ref_rejected_token_logps is not None:
            ref_rejected = _masked_sum(ref_rejected_token_logps, rejected_mask)
        return cls(
            chosen=_masked_sum(chosen_token_logps, chosen_mask),
            rejected=_masked_sum(rejected_token_logps, rejected_mask),
            ref_chosen=ref_chosen,
            ref_rejected=ref_rejected,
            chosen_len=jnp.sum(chosen_mask, axis=-1).astype(jnp.float32),
            rejected_len=jnp.sum(rejected_mask, axis=-1).astype(jnp.float32),
            chosen_token_logps=chosen_token_logps,
            rejected_token_logps=rejected_token_logps,
            chosen_mask=chosen_mask,
            rejected_mask=rejected_mask,
            **columns,
        )


@_pytree_dataclass
class UnpairedLogps:
    """A batch of single responses with binary feedback (thumbs up / down).

    Attributes:
      logps: [B] policy log-probs of the response, summed over its tokens.
      label: [B] True (or 1) for desirable, False (0) for undesirable.
      ref_logps: [B] the same under the reference.
      length: [B] response token counts.
      kl_logps, ref_kl_logps: [B] policy / reference log-probs of mismatched
        (x, y') pairs (each prompt with another example's response), used by
        KTO to estimate its KL baseline z0.
      weight: [B] caller's per-example weight (0 = padding).
      score: [B] a win probability P(y > y') of the response against a
        comparison response y' (Nash-MD: y' drawn from the geometric mixture).
    """

    logps: Array
    label: Array
    ref_logps: Optional[Array] = None
    length: Optional[Array] = None
    kl_logps: Optional[Array] = None
    ref_kl_logps: Optional[Array] = None
    weight: Optional[Array] = None
    score: Optional[Array] = None


@_pytree_dataclass
class ListLogps:
    """A batch of K ranked or scored responses per prompt.

    Attributes:
      logps: [B, K] policy log-probs of each response.
      scores: [B, K] quality labels, higher is better (ratings, reward-model
        scores, or negated ranks). Ties are allowed and contribute no pair.
      ref_logps: [B, K] reference log-probs.
      lengths: [B, K] response token counts.
      mask: [B, K] 1 for real responses, 0 for padding slots (lists shorter
        than K).
      weight: [B] caller's per-prompt weight.
    """

    logps: Array
    scores: Array
    ref_logps: Optional[Array] = None
    lengths: Optional[Array] = None
    mask: Optional[Array] = None
    weight: Optional[Array] = None


@_pytree_dataclass
class RewardPair:
    """Scalar reward-model outputs for preference pairs (reward modelling).

    Attributes:
      chosen, rejected: [B] rewards r(x, y_w) and r(x, y_l).
      margin: [B] optional required margin (or preference strength).
      weight: [B] caller's per-example weight.
    """

    chosen: Array
    rejected: Array
    margin: Optional[Array] = None
    weight: Optional[Array] = None


@_pytree_dataclass
class RatedResponses:
    """Reward-model predictions against ratings, for regression reward models.

    Attributes:
      predicted: [B, A] predicted rating for each of A attributes.
      target: [B, A] the annotated ratings.
      mask: [B, A] 1 where a rating exists.
      weight: [B] caller's per-example weight.
    """

    predicted: Array
    target: Array
    mask: Optional[Array] = None
    weight: Optional[Array] = None


@_pytree_dataclass
class LossOutput:
    """What every loss returns.

    Attributes:
      losses: [B] per-example losses (float32). The caller weights and reduces.
      metrics: dict of [B] per-example metric arrays (batch-level quantities
        are broadcast to [B]).
      state: the loss's carried state after this step (stateful losses only).
      keep: [B] optional 0/1 mask of examples the loss selected (beta-DPO's
        filtering); the caller multiplies its weights by it.
    """

    losses: Array
    metrics: dict
    state: Any = None
    keep: Optional[Array] = None
