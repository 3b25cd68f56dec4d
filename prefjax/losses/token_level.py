"""Token-level DPO (TDPO1, TDPO2): DPO with a sequential forward-KL correction.

Zeng et al. 2024 (Token-level Direct Preference Optimization, ICML) write the
Bradley-Terry model at the token level. The preference probability becomes
sigma(u - delta) with u = beta h (DPO's margin) and

    delta = beta [D(y_l) - D(y_w)],
    D(y) = sum_t KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t)),

the *sequential* forward KL summed over the response's positions. The caller
supplies the per-position KL in `chosen_token_kl` / `rejected_token_kl`
(computed next to the model, without materialising logits here) with the
response masks; this module only sums it over the masked positions.

TDPO2 scales the KL gap by alpha and stops the gradient through D(y_w), so
the loss only pushes the rejected response's KL down (the authors found
TDPO1 lets the two KLs drift apart).

Both losses follow the authors' reference `tdpo_loss` (the Token-level-Direct-
Preference-Optimization repository) and its defaults (beta = 0.1,
alpha = 0.5). `rewards/*` are DPO's implicit rewards beta * rho(y), as for
every other pairwise loss, so runs of different losses compare directly; the
authors' KL-adjusted values beta * (rho(y) + D(y)) follow from `rewards/*` and
the `kl/*` metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import logspace, pair_metrics
from prefjax.losses.hparam_domains import KL_BETA, non_negative
from prefjax.losses.registry import REFERENCE_PAIR, register
from prefjax.losses.types import LossOutput, PairLogps

Array = jax.Array

TOKEN_KL_PAIR = ("chosen_token_kl", "rejected_token_kl", "chosen_mask", "rejected_mask")


def sequential_kl(token_kl: Array, mask: Array) -> Array:
    """D_SeqKL: per-position KL summed over response tokens, [B, T] -> [B].

    Masked-out positions are dropped with `where`, not multiplied by the mask,
    so padding holding NaN or inf leaks into neither the value nor the gradient.
    """
    keep = jnp.asarray(mask).astype(bool)
    return jnp.sum(jnp.where(keep, logspace.f32(token_kl), 0.0), axis=-1)


def _tdpo_terms(lp: PairLogps, beta: float) -> tuple[Array, Array, Array, dict[str, Array]]:
    """DPO margin h, D(y_w), D(y_l) and the metrics shared by TDPO1 and TDPO2."""
    rho_w, rho_l = pair_metrics.log_ratios(lp)
    kl_w = sequential_kl(lp.chosen_token_kl, lp.chosen_mask)
    kl_l = sequential_kl(lp.rejected_token_kl, lp.rejected_mask)
    metrics = pair_metrics.reward_metrics(lp, beta * rho_w, beta * rho_l)
    metrics["kl/chosen"] = jax.lax.stop_gradient(kl_w)
    metrics["kl/rejected"] = jax.lax.stop_gradient(kl_l)
    metrics["kl/margin"] = jax.lax.stop_gradient(kl_w - kl_l)
    return rho_w - rho_l, kl_w, kl_l, metrics


@register(
    "tdpo1",
    inputs=PairLogps,
    requires=REFERENCE_PAIR + TOKEN_KL_PAIR,
    paper="Zeng et al. 2024, Token-level Direct Preference Optimization (TDPO1)",
    equation="-log sigma(beta h - beta (D_l - D_w)), "
    "D_y = sum_t KL(pi_ref(.|x,y_<t) || pi_theta(.|x,y_<t))",
    domains={"beta": KL_BETA},
)
def tdpo1(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """TDPO1 (Zeng et al. 2024): DPO's margin offset by the gap in sequential forward KL."""
    h, kl_w, kl_l, metrics = _tdpo_terms(lp, beta)
    losses = logspace.neg_log_sigmoid(beta * (h - (kl_l - kl_w)))
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "tdpo2",
    inputs=PairLogps,
    requires=REFERENCE_PAIR + TOKEN_KL_PAIR,
    paper="Zeng et al. 2024, Token-level Direct Preference Optimization (TDPO2)",
    equation="-log sigma(beta h - alpha beta (D_l - sg(D_w))), "
    "D_y = sum_t KL(pi_ref(.|x,y_<t) || pi_theta(.|x,y_<t))",
    domains={
        "beta": KL_BETA,
        "alpha": non_negative("it weighs the sequential-KL gap; a negative weight would push the rejected "
                              "response's KL up"),
    },
)
def tdpo2(lp: PairLogps, *, beta: float = 0.1, alpha: float = 0.5) -> LossOutput:
    """TDPO2 (Zeng et al. 2024): alpha-scaled KL gap, no gradient through the chosen KL."""
    h, kl_w, kl_l, metrics = _tdpo_terms(lp, beta)
    # Stop-gradient on D(y_w): only the rejected response's KL is pushed down.
    kl_gap = kl_l - jax.lax.stop_gradient(kl_w)
    losses = logspace.neg_log_sigmoid(beta * (h - alpha * kl_gap))
    return LossOutput(losses=losses, metrics=metrics)
