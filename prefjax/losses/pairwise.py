"""Pairwise losses with a reference model: DPO and its close family.

Notation (see README): rho(y) = log pi_theta(y|x) - log pi_ref(y|x), summed over
response tokens; h = rho(y_w) - rho(y_l) is the DPO margin; sigma is the
logistic function and -log sigma(z) is computed as softplus(-z).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import logspace, pair_metrics
from prefjax.losses.hparam_domains import (
    DPO_LABEL_SMOOTHING,
    KL_BETA,
    NLL_WEIGHT,
    interval,
    non_negative,
    positive,
)
from prefjax.losses.registry import LENGTH_PAIR, REFERENCE_PAIR, register
from prefjax.losses.types import LossOutput, PairLogps

Array = jax.Array
_neg_log_sigmoid = logspace.neg_log_sigmoid


def _dpo_metrics(lp: PairLogps, beta: float) -> tuple[Array, Array, dict[str, Array]]:
    """rho_w, rho_l and the standard reward metrics (rewards = beta * rho)."""
    rho_w, rho_l = pair_metrics.log_ratios(lp)
    return rho_w, rho_l, pair_metrics.reward_metrics(lp, beta * rho_w, beta * rho_l)


@register(
    "dpo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    paper="Rafailov et al. 2023, Direct Preference Optimization (eq. 7); "
    "label smoothing = cDPO (Mitchell 2023)",
    equation="-(1-eps) log sigma(beta h) - eps log sigma(-beta h)",
    domains={"beta": KL_BETA, "label_smoothing": DPO_LABEL_SMOOTHING},
)
def dpo(lp: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """DPO's sigmoid loss; `label_smoothing` = eps > 0 gives conservative DPO."""
    rho_w, rho_l, metrics = _dpo_metrics(lp, beta)
    logits = beta * (rho_w - rho_l)
    losses = (1.0 - label_smoothing) * _neg_log_sigmoid(logits) + label_smoothing * _neg_log_sigmoid(
        -logits
    )
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "robust_dpo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    paper="Chowdhury et al. 2024, Provably Robust DPO (eq. 8)",
    equation="[(1-eps)(-log sigma(beta h)) - eps(-log sigma(-beta h))] / (1 - 2 eps)",
    domains={
        "beta": KL_BETA,
        "label_smoothing": interval(
            0.0, 0.5, high_open=True,
            why="it divides by 1 - 2 label_smoothing; the method assumes flip rates below 1/2"),
    },
)
def robust_dpo(lp: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """rDPO: unbiased estimate of the clean DPO loss when labels flip at rate eps < 1/2."""
    rho_w, rho_l, metrics = _dpo_metrics(lp, beta)
    logits = beta * (rho_w - rho_l)
    eps = label_smoothing
    losses = ((1.0 - eps) * _neg_log_sigmoid(logits) - eps * _neg_log_sigmoid(-logits)) / (1.0 - 2.0 * eps)
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "ipo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    paper="Azar et al. 2023, A General Theoretical Paradigm to Understand Learning "
    "from Human Preferences (eq. 17, IPO)",
    equation="(h - 1/(2 beta))^2",
    domains={"beta": positive("it divides by it: the IPO target is 1/(2*beta)")},
)
def ipo(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """IPO: squared regression of the margin h onto 1/(2 beta) (sequence sums, as in the paper)."""
    rho_w, rho_l, metrics = _dpo_metrics(lp, beta)
    losses = (rho_w - rho_l - 1.0 / (2.0 * beta)) ** 2
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "hinge",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    paper="Liu et al. 2024, Statistical Rejection Sampling Improves Preference "
    "Optimization (RSO hinge-norm; SLiC with reference normalisation)",
    equation="max(0, 1 - beta h)",
    domains={"beta": KL_BETA},
)
def hinge(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """RSO's hinge-norm loss: SLiC's calibration hinge on the reference-normalised margin."""
    rho_w, rho_l, metrics = _dpo_metrics(lp, beta)
    losses = jax.nn.relu(1.0 - beta * (rho_w - rho_l))
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "exo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    paper="Ji et al. 2024, Towards Efficient Exact Optimization of Language Model "
    "Alignment (EXO, pairwise case of eq. 13 with smoothed labels)",
    equation="KL(p_theta || p_label): sigma(beta h)[log sigma(beta h) - log(1-eps)] "
    "+ sigma(-beta h)[log sigma(-beta h) - log eps]",
    domains={
        "beta": KL_BETA,
        "label_smoothing": interval(
            0.0, 1.0, low_open=True, high_open=True,
            why="the loss takes log(label_smoothing) and log(1 - label_smoothing)"),
    },
)
def exo(lp: PairLogps, *, beta: float = 0.1, label_smoothing: float = 1e-3) -> LossOutput:
    """EXO: reverse KL from the policy's pair distribution to the (smoothed) label distribution."""
    rho_w, rho_l, metrics = _dpo_metrics(lp, beta)
    logits = beta * (rho_w - rho_l)
    log_p_w = -_neg_log_sigmoid(logits)
    log_p_l = -_neg_log_sigmoid(-logits)
    eps = label_smoothing
    losses = jnp.exp(log_p_w) * (log_p_w - jnp.log1p(-eps)) + jnp.exp(log_p_l) * (log_p_l - jnp.log(eps))
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "nca",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    paper="Chen et al. 2024, Noise Contrastive Alignment of Language Models with "
    "Explicit Rewards (NCA, pairwise preference case)",
    equation="-log sigma(beta rho_w) - 1/2 log sigma(-beta rho_w) - 1/2 log sigma(-beta rho_l)",
    domains={"beta": KL_BETA},
)
def nca(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """NCA: optimises absolute likelihoods (rho_w up) rather than only the margin."""
    rho_w, rho_l, metrics = _dpo_metrics(lp, beta)
    r_w, r_l = beta * rho_w, beta * rho_l
    losses = _neg_log_sigmoid(r_w) + 0.5 * _neg_log_sigmoid(-r_w) + 0.5 * _neg_log_sigmoid(-r_l)
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "sppo_hard",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    paper="Wu et al. 2024, Self-Play Preference Optimization (eq. 4.8 with hard "
    "win probabilities 1 and 0, eta = 1/beta)",
    equation="(rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2",
    domains={"beta": positive("it divides by it: the targets are +-1/(2*beta)")},
)
def sppo_hard(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """SPPO with hard labels: each log-ratio regressed onto +-eta/2, eta = 1/beta."""
    rho_w, rho_l, metrics = _dpo_metrics(lp, beta)
    target = 1.0 / (2.0 * beta)
    losses = (rho_w - target) ** 2 + (rho_l + target) ** 2
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "apo_zero",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    paper="D'Oosterlinck et al. 2024, Anchored Preference Optimization (APO-zero)",
    equation="(1 - sigma(beta rho_w)) + sigma(beta rho_l)",
    domains={"beta": KL_BETA},
)
def apo_zero(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-zero: push chosen likelihood up and rejected down, each anchored at the reference."""
    rho_w, rho_l, metrics = _dpo_metrics(lp, beta)
    losses = jax.nn.sigmoid(-beta * rho_w) + jax.nn.sigmoid(beta * rho_l)
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "apo_down",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    paper="D'Oosterlinck et al. 2024, Anchored Preference Optimization (APO-down)",
    equation="sigma(beta rho_w) + (1 - sigma(beta h))",
    domains={"beta": KL_BETA},
)
def apo_down(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-down: both likelihoods go down, the rejected one faster (for chosen worse than the model)."""
    rho_w, rho_l, metrics = _dpo_metrics(lp, beta)
    losses = jax.nn.sigmoid(beta * rho_w) + jax.nn.sigmoid(-beta * (rho_w - rho_l))
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "dpo_positive",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    paper="Pal et al. 2024, Smaug: Fixing Failure Modes of Preference Optimisation "
    "with DPO-Positive (eq. 3)",
    equation="-log sigma(beta [h - lambda max(0, -rho_w)])",
    domains={
        "beta": KL_BETA,
        "dpop_lambda": non_negative(
            "it weighs the penalty on a chosen log-ratio below 0; a negative weight would reward it"),
    },
)
def dpo_positive(lp: PairLogps, *, beta: float = 0.1, dpop_lambda: float = 50.0) -> LossOutput:
    """DPOP: DPO plus a penalty whenever the chosen log-prob falls below the reference's."""
    rho_w, rho_l, metrics = _dpo_metrics(lp, beta)
    penalty = jax.nn.relu(-rho_w)
    losses = _neg_log_sigmoid(beta * (rho_w - rho_l - dpop_lambda * penalty))
    metrics["dpop/penalty"] = jax.lax.stop_gradient(penalty)
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "ln_dpo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR + LENGTH_PAIR,
    paper="Ahrabian et al. 2024, The Hitchhiker's Guide to Human Alignment with *PO (LN-DPO)",
    equation="-log sigma(beta [rho_w/|y_w| - rho_l/|y_l|])",
    domains={"beta": KL_BETA},
)
def ln_dpo(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Length-normalised DPO: per-token log-ratios instead of sequence sums."""
    rho_w, rho_l = pair_metrics.log_ratios(lp)
    rho_w = logspace.safe_divide(rho_w, logspace.f32(lp.chosen_len))
    rho_l = logspace.safe_divide(rho_l, logspace.f32(lp.rejected_len))
    metrics = pair_metrics.reward_metrics(lp, beta * rho_w, beta * rho_l)
    return LossOutput(losses=_neg_log_sigmoid(beta * (rho_w - rho_l)), metrics=metrics)


@register(
    "length_regularized_dpo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR + LENGTH_PAIR,
    paper="Park et al. 2024, Disentangling Length from Quality in Direct Preference "
    "Optimization (R-DPO, eq. 9)",
    equation="-log sigma(beta h + alpha (|y_w| - |y_l|))",
    domains={
        "beta": KL_BETA,
        "alpha": non_negative(
            "it weighs the length regulariser; a negative weight would favour longer responses"),
    },
)
def length_regularized_dpo(lp: PairLogps, *, beta: float = 0.1, alpha: float = 0.01) -> LossOutput:
    """R-DPO: the reward r - alpha |y| in the Bradley-Terry model, so length alone earns no margin."""
    rho_w, rho_l, metrics = _dpo_metrics(lp, beta)
    length_gap = logspace.f32(lp.chosen_len) - logspace.f32(lp.rejected_len)
    losses = _neg_log_sigmoid(beta * (rho_w - rho_l) + alpha * length_gap)
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "rpo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR + ("chosen_len",),
    paper="Liu et al. 2024, Provably Mitigating Overoptimization in RLHF: Your SFT "
    "Loss is Implicitly an Adversarial Regularizer (RPO, regularised)",
    equation="-log sigma(beta h) + alpha * (-log pi_theta(y_w|x) / |y_w|)",
    domains={"beta": KL_BETA, "alpha": NLL_WEIGHT},
)
def rpo(lp: PairLogps, *, beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """Regularised PO: DPO plus alpha times the token-mean NLL of the chosen response (TRL's rpo_alpha)."""
    rho_w, rho_l, metrics = _dpo_metrics(lp, beta)
    nll = -logspace.safe_divide(logspace.f32(lp.chosen), logspace.f32(lp.chosen_len))
    losses = _neg_log_sigmoid(beta * (rho_w - rho_l)) + alpha * nll
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    return LossOutput(losses=losses, metrics=metrics)
