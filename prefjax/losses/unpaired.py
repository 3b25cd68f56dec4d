"""Losses for binary feedback (thumbs up / down): KTO, BCO, NPO; and BCO on pairs.

Notation (see README): rho(y) = log pi_theta(y|x) - log pi_ref(y|x), summed over
response tokens; sigma is the logistic function. `UnpairedLogps.label` is True
(or 1) for a desirable response and False (or 0) for an undesirable one.

Batch statistics (KTO's KL baseline z0, BCO's reward shift delta) leave out
padding examples (weight 0). They use the weight column only as a padding mask,
never its magnitude: a caller may put class-balancing or BCO's density-ratio
weights there, and those weight an example's loss, not the reference point.

Per-example metrics follow TRL's KTO/BCO logging: `rewards/chosen_sum` holds an
example's reward when it is desirable and 0 otherwise, `count/chosen` holds 1
when it is desirable; the batch sum of the first divided by the batch sum of the
second is TRL's `rewards/chosen` (likewise for `rejected` and `logps/*`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from prefjax.losses import logspace, pair_metrics
from prefjax.losses.hparam_domains import KL_BETA, NLL_WEIGHT, non_negative, positive
from prefjax.losses.registry import REFERENCE_PAIR, register
from prefjax.losses.types import LossOutput, PairLogps, UnpairedLogps

Array = jax.Array
_neg_log_sigmoid = logspace.neg_log_sigmoid


# --------------------------------------------------------------------------- helpers


def _desirable(up: UnpairedLogps) -> Array:
    """[B] bool: labels may arrive as bool or as 0/1 integers or floats."""
    return jnp.asarray(up.label) > 0


def _example_mask(weight: Optional[Array], like: Array) -> Array:
    """[B] float32 1/0: 1 for real examples, 0 for padding (weight 0)."""
    if weight is None:
        return jnp.ones(jnp.shape(like), jnp.float32)
    return (logspace.f32(weight) > 0).astype(jnp.float32)


def _log_ratio(up: UnpairedLogps) -> Array:
    """rho(y) = log pi_theta(y|x) - log pi_ref(y|x) in float32."""
    return logspace.f32(up.logps) - logspace.f32(up.ref_logps)


def _unpaired_metrics(up: UnpairedLogps, rewards: Array, desirable: Array) -> dict[str, Array]:
    """TRL-style per-class sums and counts (see module docstring), all detached."""
    rewards = jax.lax.stop_gradient(rewards)
    logps = jax.lax.stop_gradient(logspace.f32(up.logps))
    chosen = desirable.astype(jnp.float32)
    return {
        "rewards": rewards,
        "rewards/chosen_sum": jnp.where(desirable, rewards, 0.0),
        "rewards/rejected_sum": jnp.where(desirable, 0.0, rewards),
        "logps/chosen_sum": jnp.where(desirable, logps, 0.0),
        "logps/rejected_sum": jnp.where(desirable, 0.0, logps),
        "count/chosen": chosen,
        "count/rejected": 1.0 - chosen,
    }


def _broadcast(scalar: Array, like: Array) -> Array:
    """A detached batch-level scalar as a [B] metric."""
    return jnp.broadcast_to(jax.lax.stop_gradient(scalar), jnp.shape(like)).astype(jnp.float32)


# ------------------------------------------------------------------------------- KTO


@register(
    "kto",
    inputs=UnpairedLogps,
    requires=("ref_logps", "kl_logps", "ref_kl_logps"),
    paper="Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic "
    "Optimization (KTO loss with the mismatched-pair estimate of z0, sec. 4; as in TRL's KTOTrainer)",
    equation="lambda_y - v; v = lambda_D sigma(beta (rho - z0)) if desirable, "
    "lambda_U sigma(beta (z0 - rho)) if undesirable; z0 = max(0, mean rho(x, y')) without gradient",
    domains={
        "beta": KL_BETA,
        "desirable_weight": non_negative("lambda_D weighs desirable examples' losses; a negative weight "
                                         "would push their value down"),
        "undesirable_weight": non_negative("lambda_U weighs undesirable examples' losses; a negative weight "
                                           "would push their value down"),
    },
)
def kto(
    up: UnpairedLogps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO: a prospect-theoretic value of each response relative to the KL baseline z0."""
    desirable = _desirable(up)
    mask = _example_mask(up.weight, up.logps)
    kl_ratio = logspace.f32(up.kl_logps) - logspace.f32(up.ref_kl_logps)
    # z0 is a reference point, not an objective: no gradient flows through it, and
    # a negative estimate (possible from a finite sample) is clamped at the true KL's floor.
    z0 = jax.lax.stop_gradient(jnp.maximum(logspace.weighted_batch_mean(kl_ratio, mask), 0.0))
    rho = _log_ratio(up)
    # lambda - lambda sigma(z) = lambda sigma(-z): bounded in [0, lambda] and exact at both ends.
    losses = jnp.where(
        desirable,
        desirable_weight * jax.nn.sigmoid(-beta * (rho - z0)),
        undesirable_weight * jax.nn.sigmoid(-beta * (z0 - rho)),
    )
    metrics = _unpaired_metrics(up, beta * rho, desirable)
    metrics["kto/kl"] = _broadcast(z0, rho)
    return LossOutput(losses=losses, metrics=metrics)


# ------------------------------------------------------------------------------- BCO


def _running_mean_init(**_) -> dict[str, Array]:
    """BCO's reward-shift state before the first step: no rewards seen yet."""
    return {"mean": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32)}


def _running_mean_update(state: dict[str, Array], rewards: Array, mask: Array) -> dict[str, Array]:
    """Cumulative mean of all real rewards seen so far, this batch included (detached).

    The incremental form mean + (sum - n mean) / (count + n) stays accurate when
    count is large; count is exact in float32 up to 2^24 examples and only
    loses weight precision (not the mean) beyond that.
    """
    rewards = jax.lax.stop_gradient(rewards)
    mean, count = logspace.f32(state["mean"]), logspace.f32(state["count"])
    n = jnp.sum(mask)
    batch_sum = jnp.sum(jnp.where(mask > 0, rewards, 0.0))
    new_count = count + n
    # new_count is 0 only if nothing has been seen yet; then the mean stays 0.
    new_mean = mean + (batch_sum - n * mean) / jnp.maximum(new_count, 1.0)
    return {"mean": new_mean, "count": new_count}


def _bco_terms(shifted_reward: Array, desirable: Array | bool) -> Array:
    """Binary cross-entropy with logit r - delta: label 1 for desirable, 0 otherwise."""
    return jnp.where(desirable, _neg_log_sigmoid(shifted_reward), _neg_log_sigmoid(-shifted_reward))


@register(
    "bco",
    inputs=UnpairedLogps,
    requires=("ref_logps",),
    paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model "
    "Alignment (BCO with reward shift; delta = running mean of rewards as in TRL's BCOTrainer)",
    equation="-log sigma(beta rho - delta) if desirable, -log sigma(-(beta rho - delta)) if undesirable; "
    "delta = running mean of beta rho over all examples seen",
    init_state=_running_mean_init,
    domains={"beta": KL_BETA},
)
def bco(up: UnpairedLogps, state: dict[str, Array], *, beta: float = 0.1) -> LossOutput:
    """BCO: a logistic classifier of desirability whose logit is the shifted implicit reward.

    The paper's underlying-distribution matching (UDM) multiplies each undesirable
    example's loss by a density ratio p(desirable|x) / p(undesirable|x) from a
    prompt classifier; the caller applies it through the `weight` column (it does
    not enter delta, which only uses `weight` to skip padding). The returned state
    already includes this batch; at evaluation the caller should discard it.
    """
    desirable = _desirable(up)
    mask = _example_mask(up.weight, up.logps)
    rewards = beta * _log_ratio(up)
    new_state = _running_mean_update(state, rewards, mask)
    delta = jax.lax.stop_gradient(new_state["mean"])
    losses = _bco_terms(rewards - delta, desirable)
    metrics = _unpaired_metrics(up, rewards, desirable)
    metrics["bco/delta"] = _broadcast(delta, rewards)
    return LossOutput(losses=losses, metrics=metrics, state=new_state)


@register(
    "bco_pair",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model "
    "Alignment (paired form of the BCE bound with reward shift; TRL's DPO loss_type='bco_pair')",
    equation="-log sigma(beta rho_w - delta) - log sigma(-(beta rho_l - delta)); "
    "delta = running mean of beta rho_w and beta rho_l over all pairs seen",
    init_state=_running_mean_init,
    domains={"beta": KL_BETA},
)
def bco_pair(lp: PairLogps, state: dict[str, Array], *, beta: float = 0.1) -> LossOutput:
    """BCO on preference pairs: chosen classified desirable, rejected undesirable, one shared delta."""
    rho_w, rho_l = pair_metrics.log_ratios(lp)
    r_w, r_l = beta * rho_w, beta * rho_l
    mask = _example_mask(lp.weight, lp.chosen)
    # Each pair contributes two rewards to the running mean, like TRL's concatenation.
    new_state = _running_mean_update(
        state, jnp.concatenate([r_w, r_l]), jnp.concatenate([mask, mask])
    )
    delta = jax.lax.stop_gradient(new_state["mean"])
    losses = _bco_terms(r_w - delta, True) + _bco_terms(r_l - delta, False)
    metrics = pair_metrics.reward_metrics(lp, r_w, r_l)
    metrics["bco/delta"] = _broadcast(delta, r_w)
    return LossOutput(losses=losses, metrics=metrics, state=new_state)


# ------------------------------------------------------------------------------- NPO


@register(
    "npo",
    inputs=UnpairedLogps,
    requires=("ref_logps",),
    uses=("length",),
    paper="Zhang et al. 2024, Negative Preference Optimization: From Catastrophic "
    "Collapse to Effective Unlearning (eq. 3; NPO+RT with retain_weight > 0)",
    equation="undesirable (forget): -(2/beta) log sigma(-beta rho); "
    "desirable (retain): retain_weight * (-log pi_theta(y|x) / |y|)",
    domains={
        "beta": positive("it divides by it: the forget loss is (2/beta) log(1 + (pi/pi_ref)^beta)"),
        "retain_weight": NLL_WEIGHT,
    },
)
def npo(up: UnpairedLogps, *, beta: float = 0.1, retain_weight: float = 0.0) -> LossOutput:
    """NPO: DPO without positives, for unlearning; it tends to gradient ascent as beta -> 0.

    Desirable examples form the retain set. Their NLL is the token mean when
    `length` is given (as in the authors' TOFU code, which uses the model's mean
    cross-entropy) and the sequence NLL of the paper's L_RT otherwise.
    """
    desirable = _desirable(up)
    rho = _log_ratio(up)
    forget = (2.0 / beta) * _neg_log_sigmoid(-beta * rho)
    nll = -logspace.f32(up.logps)
    if up.length is not None:
        nll = logspace.safe_divide(nll, logspace.f32(up.length))
    losses = jnp.where(desirable, retain_weight * nll, forget)
    metrics = _unpaired_metrics(up, beta * rho, desirable)
    metrics["nll_loss"] = jax.lax.stop_gradient(jnp.where(desirable, nll, 0.0))
    return LossOutput(losses=losses, metrics=metrics)
