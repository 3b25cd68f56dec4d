"""Reward-model training losses: pairwise Bradley-Terry and rating regression.

These take the reward model's scalar outputs, not log-probs:
  * `bradley_terry` (RewardPair): -log sigma(r_w - r_l), with the optional
    margin of Llama 2 / TRL's RewardTrainer, HelpSteer2-Preference's scaled
    variant, and the reward-centering penalty of Eisenstein et al.;
  * `rating_regression` (RatedResponses): squared error against annotated
    multi-attribute ratings (SteerLM / HelpSteer2 regression reward models).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import logspace
from prefjax.losses.hparam_domains import Choice, Flag, non_negative
from prefjax.losses.registry import register
from prefjax.losses.types import LossOutput, RatedResponses, RewardPair

Array = jax.Array
ATTRIBUTE_REDUCTIONS = ("mean", "sum")


def _reward_metrics(r_w: Array, r_l: Array) -> dict[str, Array]:
    """TRL's reward-model metrics, per example and detached, and calibration: the model's
    probability that the chosen response wins, sigma(r_w - r_l), whose mean a calibrated model
    matches to its accuracy, and the Brier score (1 - sigma(r_w - r_l))^2."""
    r_w, r_l = jax.lax.stop_gradient(r_w), jax.lax.stop_gradient(r_l)
    p_chosen = jax.nn.sigmoid(r_w - r_l)
    return {
        "rewards/chosen": r_w,
        "rewards/rejected": r_l,
        "rewards/margins": r_w - r_l,
        "rewards/accuracies": (r_w > r_l).astype(jnp.float32),
        "rewards/chosen_probability": p_chosen,
        "rewards/brier": (1.0 - p_chosen) ** 2,
    }


@register(
    "bradley_terry",
    inputs=RewardPair,
    uses=("margin",),
    paper="Bradley-Terry reward modelling (Ouyang et al. 2022); margin: Touvron et al. 2023 "
    "(Llama 2) as in TRL's RewardTrainer; scaled: Wang et al. 2024, HelpSteer2-Preference "
    "(Scaled BT); centering: Eisenstein et al. 2023, Helping or Herding? (eq. 2)",
    equation="-log sigma(r_w - r_l - m) [scaled: -m log sigma(r_w - r_l)] + c (r_w + r_l)^2",
    domains={
        "use_margin": Flag(why="it switches the margin column's offset on or off"),
        "scaled": Flag(why="it switches the margin column from an offset to a multiplier"),
        "center_rewards_coefficient": non_negative(
            "it weighs the penalty (r_w + r_l)^2; a negative weight would push the rewards away from 0"),
    },
)
def bradley_terry(
    rp: RewardPair,
    *,
    use_margin: bool = True,
    scaled: bool = False,
    center_rewards_coefficient: float = 0.0,
) -> LossOutput:
    """Bradley-Terry reward-model loss with optional margin, scaling and reward centering.

    `margin` column: with ``use_margin`` (and not ``scaled``) it is subtracted
    from r_w - r_l (Llama 2's margin loss, TRL's behaviour when a margin column
    exists); with ``scaled=True`` it is instead the preference strength m that
    multiplies the loss (HelpSteer2-Preference: m = 1, 2, 3 for slightly
    better / better / much better), and is never subtracted. Absent column:
    plain Bradley-Terry. ``center_rewards_coefficient`` adds c (r_w + r_l)^2,
    which pulls the rewards towards mean zero (TRL recommends c = 0.01).
    """
    r_w, r_l = logspace.f32(rp.chosen), logspace.f32(rp.rejected)
    diff = r_w - r_l
    if scaled:
        if rp.margin is None:
            raise ValueError("bradley_terry(scaled=True) needs the margin column as the preference strength")
        losses = logspace.f32(rp.margin) * logspace.neg_log_sigmoid(diff)
    elif use_margin and rp.margin is not None:
        losses = logspace.neg_log_sigmoid(diff - logspace.f32(rp.margin))
    else:
        losses = logspace.neg_log_sigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (r_w + r_l) ** 2
    return LossOutput(losses=losses, metrics=_reward_metrics(r_w, r_l))


@register(
    "rating_regression",
    inputs=RatedResponses,
    uses=("mask",),
    paper="Wang et al. 2024, HelpSteer2: Open-source dataset for training top-performing "
    "reward models (regression RM, as in SteerLM / NeMo-Aligner's regression reward model)",
    equation="mean (or sum) over rated attributes a of (r_a(x, y) - rating_a)^2",
    domains={"attribute_reduction": Choice(why="how squared errors combine over attributes",
                                           choices=ATTRIBUTE_REDUCTIONS)},
)
def rating_regression(rr: RatedResponses, *, attribute_reduction: str = "mean") -> LossOutput:
    """Multi-attribute rating regression (HelpSteer2 / SteerLM regression reward model).

    ``attribute_reduction="mean"`` (default) averages the squared errors over
    the attributes that have a rating, which matches NeMo-Aligner's masked MSE
    when every attribute is rated (it divides by the count of rated entries in
    the whole micro-batch instead); ``"sum"`` sums them. An example with no
    rated attribute contributes 0. `where`, not multiplication, drops unrated
    entries so a NaN placeholder rating cannot leak.
    """
    predicted, target = logspace.f32(rr.predicted), logspace.f32(rr.target)
    if rr.mask is None:
        rated = jnp.ones(predicted.shape, bool)
    else:
        rated = jnp.asarray(rr.mask).astype(bool)
    error = jnp.where(rated, predicted - jnp.where(rated, target, 0.0), 0.0)
    squared = jnp.sum(error**2, axis=-1)
    absolute = jnp.sum(jnp.abs(error), axis=-1)
    count = jnp.sum(rated, axis=-1).astype(jnp.float32)
    losses = logspace.safe_divide(squared, count) if attribute_reduction == "mean" else squared
    metrics = {
        "rating/mse": jax.lax.stop_gradient(logspace.safe_divide(squared, count)),
        "rating/mae": jax.lax.stop_gradient(logspace.safe_divide(absolute, count)),
    }
    return LossOutput(losses=losses, metrics=metrics)
