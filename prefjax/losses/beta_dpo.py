"""beta-DPO: DPO whose beta is recalibrated every batch from the batch's reward gaps.

Wu et al. 2024 ("beta-DPO: Direct Preference Optimization with Dynamic beta",
NeurIPS 2024), as implemented in the authors' trainer (junkangwu/beta-DPO,
`preference_loss` with mode_loss="beta_DPO"). Per step, with the gap
M_i = h_i = rho_w - rho_l (the raw log-ratio margin, without beta, as in the
authors' code):

  1. running statistics, updated *before* they are used (momentum m = 0.9):
        M_0   <- m M_0   + (1 - m) mean_i M_i
        sigma <- m sigma + (1 - m) std_i M_i      (Bessel-corrected, like torch.std)
     both start at 0;
  2. beta-guided filtering: draw max(1, floor(rho n)) of the n non-padding
     examples without replacement, with probabilities proportional to
     exp(-(M_i - M_0)^2 / (2 sigma^2)) -- outliers far from the running mean are
     the likely ones to be left out (the authors' int(n (1 - 0.2)), minimum 1 added);
  3. beta_batch = beta * (1 + alpha (mean_{selected} M_i - M_0)), clamped to >= 1e-3,
     and treated as a constant (no gradient);
  4. loss_i = -log sigma(beta_batch h_i); the caller averages over the selected
     examples only (LossOutput.keep, see reduction.py).

Sampling without replacement is done with the Gumbel-top-k trick (identical in
distribution to torch.multinomial(replacement=False)) in log space, so the
weights cannot underflow. The PRNG key lives in the state and is split every
step, making a run deterministic and resumable from a checkpointed state.

Statistics and selection are over the batch the loss is given: the authors
all-gather across devices (one global batch) but compute per micro-batch under
gradient accumulation; pass the batch you mean.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from prefjax.losses import logspace, pair_metrics
from prefjax.losses.hparam_domains import KL_BETA, Integer, interval, non_negative
from prefjax.losses.registry import REFERENCE_PAIR, register
from prefjax.losses.types import LossOutput, PairLogps

Array = jax.Array

MIN_BETA = 1e-3  # the authors' clamp on beta_batch
MIN_STD = 1e-6  # floor on sigma so (M_i - M_0) / sigma stays finite
_MAX_ABS_Z = 1e6  # |z| cap so z^2 stays finite in float32 (log-weights down to -5e11)
# floor(n * rho) in float32 can land just below an integer (n * 0.7 = 6.9999995);
# this nudge restores the exact count without changing any genuine fraction below 1 - 1e-4.
_COUNT_EPS = 1e-4


class BetaDPOState(NamedTuple):
    """beta-DPO's carried state: running gap statistics and the selection PRNG key.

    Attributes:
      gap_mean: [] running mean M_0 of the gap h (starts at 0).
      gap_std: [] running standard deviation sigma of the gap (starts at 0).
      key: [2] uint32 PRNG key, split once per step.
    """

    gap_mean: Array
    gap_std: Array
    key: Array


def init_beta_dpo_state(*, seed: int = 0, **_: object) -> BetaDPOState:
    """The state before the first step (M_0 = sigma = 0, as in the authors' trainer)."""
    return BetaDPOState(
        gap_mean=jnp.zeros((), jnp.float32),
        gap_std=jnp.zeros((), jnp.float32),
        key=jax.random.PRNGKey(seed),
    )


def _batch_mean_std(gap: Array, valid: Array) -> tuple[Array, Array, Array]:
    """(count, mean, Bessel-corrected std) of the gap over valid examples; 0 when empty."""
    count = jnp.sum(valid)
    mean = logspace.weighted_batch_mean(gap, valid)
    sq_dev = jnp.where(valid > 0, (gap - mean) ** 2, 0.0)
    var = jnp.sum(sq_dev) / jnp.maximum(count - 1.0, 1.0)
    return count, mean, jnp.sqrt(var)


def _gaussian_select(gap: Array, valid: Array, center: Array, scale: Array, count: Array,
                     key: Array) -> Array:
    """[B] 0/1 mask of `count` valid examples drawn without replacement, p_i ~ N(gap_i; center, scale).

    Gumbel-top-k: the `count` largest log p_i + Gumbel_i are a draw without
    replacement from p (successive sampling). Invalid examples get -inf and are
    never drawn as long as count <= number of valid examples.
    """
    z = jnp.clip((gap - center) / jnp.maximum(scale, MIN_STD), -_MAX_ABS_Z, _MAX_ABS_Z)
    perturbed = -0.5 * z**2 + jax.random.gumbel(key, gap.shape, jnp.float32)
    perturbed = jnp.where(valid > 0, perturbed, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-perturbed))  # 0 for the largest
    return ((rank < count) & (valid > 0)).astype(jnp.float32)


@register(
    "beta_dpo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    uses=("weight",),
    paper="Wu et al. 2024, beta-DPO: Direct Preference Optimization with Dynamic beta "
    "(NeurIPS 2024; authors' code junkangwu/beta-DPO)",
    equation="-log sigma(beta_b h) on floor(rho B) pairs drawn w/o replacement with p ~ "
    "exp(-(h-M_0)^2/2 sigma^2); beta_b = beta (1 + alpha (mean_sel h - M_0)), M_0, sigma EMAs of h",
    init_state=init_beta_dpo_state,
    domains={
        "beta": KL_BETA,
        "alpha": non_negative("beta's sensitivity to the selected pairs' gap; a negative value would lower "
                              "beta on informative batches, the opposite of the method"),
        "rho": interval(0.0, 1.0, low_open=True, why="the fraction of the batch kept: it must keep something "
                        "and cannot keep more than all"),
        "momentum": interval(0.0, 1.0, high_open=True, why="the running statistics' EMA weight: at 1 they "
                             "never move from their start at 0"),
        "seed": Integer(why="it seeds the selection's PRNG key"),
    },
)
def beta_dpo(
    lp: PairLogps,
    state: BetaDPOState,
    *,
    beta: float = 0.1,
    alpha: float = 0.6,
    rho: float = 0.8,
    momentum: float = 0.9,
    seed: int = 0,
) -> LossOutput:
    """beta-DPO (Wu et al. 2024): per-batch beta from the gap statistics, plus Gaussian filtering.

    alpha: beta's sensitivity to the selected gap (the README's a = 0.6).
    rho: fraction of the (non-padding) batch kept, max(1, floor(rho n)); the
      authors' filtering ratio 0.2 keeps 0.8. rho = 1 with alpha = 0 is DPO.
    momentum: m of the running mean and std of the gap (0.9).
    seed: seeds the PRNG key of `init_beta_dpo_state`; unused by the step itself.
    Padding examples (weight == 0) enter neither the statistics nor the
    selection; a batch with no real example leaves the statistics unchanged.
    Returns losses for every example and `keep` (the selected ones).
    """
    del seed  # consumed by init_state
    rho_w, rho_l = pair_metrics.log_ratios(lp)
    h = rho_w - rho_l
    gap = jax.lax.stop_gradient(h)
    valid = jnp.ones_like(gap) if lp.weight is None else (logspace.f32(lp.weight) > 0).astype(jnp.float32)

    count, batch_mean, batch_std = _batch_mean_std(gap, valid)
    has_data = count > 0
    gap_mean = jnp.where(has_data, momentum * state.gap_mean + (1.0 - momentum) * batch_mean, state.gap_mean)
    gap_std = jnp.where(has_data, momentum * state.gap_std + (1.0 - momentum) * batch_std, state.gap_std)

    next_key, step_key = jax.random.split(state.key)
    n_keep = jnp.where(has_data, jnp.maximum(1.0, jnp.floor(count * rho + _COUNT_EPS)), 0.0)
    keep = _gaussian_select(gap, valid, gap_mean, gap_std, n_keep, step_key)

    selected_mean = logspace.weighted_batch_mean(gap, keep)
    beta_batch = jnp.maximum(beta * (1.0 + alpha * (selected_mean - gap_mean)), MIN_BETA)
    beta_batch = jax.lax.stop_gradient(beta_batch)
    losses = logspace.neg_log_sigmoid(beta_batch * h)

    metrics = pair_metrics.reward_metrics(lp, beta * rho_w, beta * rho_l)
    ones = jnp.ones_like(gap)
    metrics["beta_dpo/beta"] = beta_batch * ones
    metrics["beta_dpo/gap_mean"] = jax.lax.stop_gradient(gap_mean) * ones
    metrics["beta_dpo/gap_std"] = jax.lax.stop_gradient(gap_std) * ones
    metrics["beta_dpo/selected"] = keep
    new_state = BetaDPOState(gap_mean=gap_mean, gap_std=gap_std, key=next_key)
    return LossOutput(losses=losses, metrics=metrics, state=new_state, keep=keep)
