"""f-DPO: DPO under a general f-divergence constraint instead of the reverse KL.

Wang et al. 2024 ("Beyond Reverse KL: Generalizing Direct Preference
Optimization with Diverse Divergence Constraints", ICLR 2024) show that when the
RLHF objective is regularised by D_f(pi_theta || pi_ref), the implicit reward is
r(x, y) = beta f'(u) + const with u = pi_theta(y|x) / pi_ref(y|x) = exp(rho),
so the Bradley-Terry likelihood becomes

    L = -log sigma(beta f'(u_w) - beta f'(u_l)).

The derivatives of the generators f (the paper's Table 1; the additive constants
of f' cancel between y_w and y_l and are dropped here):

    reverse KL   f(u) = u log u                        f'(u) = log u + 1
    forward KL   f(u) = -log u                         f'(u) = -1/u
    JS           f(u) = u log u - (u+1) log((u+1)/2)   f'(u) = log(2u / (1+u))
    alpha        f(u) = (u^(1-a) - (1-a) u - a) / (a (a-1))
                                                       f'(u) = (1 - u^(-a)) / a

The alpha-divergence tends to the reverse KL as a -> 0 (f'(u) -> log u) and is the
forward KL at a = 1 (f'(u) = 1 - 1/u). Reverse KL is exactly DPO.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import logspace, pair_metrics
from prefjax.losses.hparam_domains import KL_BETA, Choice, interval, positive
from prefjax.losses.registry import REFERENCE_PAIR, register
from prefjax.losses.types import LossOutput, PairLogps

Array = jax.Array

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def _clipped_exp_arg(x: Array, clip: float) -> Array:
    """Clips an exponent so exp() stays finite in float32 (e^50 ~ 5e21 << 3e38)."""
    return jnp.clip(x, -clip, clip)


def f_prime(rho: Array, divergence: str, alpha: float, log_ratio_clip: float) -> Array:
    """f'(u) at u = exp(rho), up to an additive constant, computed without overflow.

    Reverse KL and JS stay in log space (no exponential at all); forward KL and
    the alpha-divergence exponentiate -rho or -alpha*rho, clipped to
    +-log_ratio_clip. Beyond the clip the value is constant, so its gradient is
    zero there rather than infinite.
    """
    if divergence == "reverse_kl":
        return rho
    if divergence == "forward_kl":
        return -jnp.exp(_clipped_exp_arg(-rho, log_ratio_clip))
    if divergence == "js":
        # log(2u/(1+u)) = log 2 + log sigma(rho); log 2 cancels in the difference.
        return -logspace.neg_log_sigmoid(rho)
    if divergence == "alpha":
        # (1 - u^-a)/a = -expm1(-a rho)/a: expm1 keeps the a -> 0 limit (= rho) accurate.
        return -jnp.expm1(_clipped_exp_arg(-alpha * rho, log_ratio_clip)) / alpha
    raise ValueError(f"fdpo: unknown divergence {divergence!r}; valid divergences are {DIVERGENCES}")


@register(
    "fdpo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    paper="Wang et al. 2024, Beyond Reverse KL: Generalizing Direct Preference "
    "Optimization with Diverse Divergence Constraints (f-DPO, Table 1)",
    equation="-log sigma(beta f'(exp rho_w) - beta f'(exp rho_l)); f' of reverse KL, "
    "forward KL, JS or alpha-divergence",
    domains={
        "beta": KL_BETA,
        "divergence": Choice(why="the f-divergences whose f' is implemented, the paper's Table 1",
                             choices=DIVERGENCES),
        "alpha": positive("the alpha-divergence divides by it: f'(u) = (1 - u^-alpha)/alpha (read only with "
                          "divergence='alpha')"),
        "log_ratio_clip": interval(
            0.0, 88.0, low_open=True,
            why="it bounds the exponent of exp(): 0 leaves no range, and exp() of more than 88.7 "
            "overflows float32"),
    },
)
def fdpo(
    lp: PairLogps,
    *,
    beta: float = 0.1,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    log_ratio_clip: float = 50.0,
) -> LossOutput:
    """f-DPO (Wang et al. 2024): DPO with the reverse-KL f' replaced by another divergence's.

    `alpha` is used only by divergence="alpha" (the paper studies 0 < alpha < 1;
    alpha = 1 is the forward KL). `log_ratio_clip` bounds the exponent of the
    exponentials in forward KL and alpha (rho can reach +-1e4). The rewards/*
    metrics are the f-DPO implicit rewards beta f'(u) (constants dropped), so that
    rewards/margins is the loss's logit; for reverse_kl they equal DPO's.
    """
    rho_w, rho_l = pair_metrics.log_ratios(lp)
    reward_w = beta * f_prime(rho_w, divergence, alpha, log_ratio_clip)
    reward_l = beta * f_prime(rho_l, divergence, alpha, log_ratio_clip)
    losses = logspace.neg_log_sigmoid(reward_w - reward_l)
    return LossOutput(losses=losses, metrics=pair_metrics.reward_metrics(lp, reward_w, reward_l))
