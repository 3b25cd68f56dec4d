"""Reference-free pairwise losses: SimPO, ORPO, CPO, CPO-SimPO, Triple-PO, ASFT, SLiC-HF.

None of these needs a frozen reference model: each scores a response by the
policy's own log-likelihood, either the sequence sum l(y) = log pi_theta(y|x)
(CPO, Triple-PO, SLiC-HF) or the length average m(y) = l(y) / |y| (SimPO,
ORPO, ASFT, CPO-SimPO). Several add a supervised negative log-likelihood term
on a preferred response; where the authors' code computes it as a token-mean
cross-entropy we use the per-example token mean -l(y) / |y|, so that the
caller's weighted mean over examples reproduces it up to the batch's token
weighting.

ORPO and ASFT use the odds P / (1 - P) of the length-averaged probability
P = exp(m(y)); it is computed in log space (`logspace.log_odds`) so that a
response with m(y) near 0 (P near 1) or far below it stays finite.
"""

from __future__ import annotations

import jax

from prefjax.losses import logspace, pair_metrics
from prefjax.losses.hparam_domains import DPO_LABEL_SMOOTHING, NLL_WEIGHT, any_real, non_negative, positive
from prefjax.losses.registry import LENGTH_PAIR, register
from prefjax.losses.types import LossOutput, PairLogps

Array = jax.Array
_neg_log_sigmoid = logspace.neg_log_sigmoid
_stop = jax.lax.stop_gradient
# beta of the reference-free Bradley-Terry losses (CPO, CPO-SimPO, TPO): the scale of the policy-only reward.
POLICY_REWARD_BETA = positive(
    "it scales the reward beta*l(y); 0 gives no gradient and a negative value prefers the rejected response")


def _sequence_logps(lp: PairLogps) -> tuple[Array, Array]:
    """l(y_w), l(y_l): summed policy log-probs in float32."""
    return logspace.f32(lp.chosen), logspace.f32(lp.rejected)


def _token_mean_nll(logp: Array, length: Array) -> Array:
    """-log pi(y|x) / |y|: the per-example token-mean cross-entropy of a response."""
    return -logspace.safe_divide(logspace.f32(logp), logspace.f32(length))


def _smoothed_sigmoid_loss(logits: Array, label_smoothing: float) -> Array:
    """-(1-eps) log sigma(z) - eps log sigma(-z): the Bradley-Terry loss with flipped-label smoothing."""
    # No Python branch on eps: hyperparameters may arrive as traced values.
    return (1.0 - label_smoothing) * _neg_log_sigmoid(logits) + label_smoothing * _neg_log_sigmoid(-logits)


@register(
    "simpo",
    inputs=PairLogps,
    requires=LENGTH_PAIR,
    paper="Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward (eq. 6); "
    "label smoothing as in the authors' trainer",
    equation="-log sigma(beta l(y_w)/|y_w| - beta l(y_l)/|y_l| - gamma), l(y) = log pi_theta(y|x)",
    domains={
        "beta": positive("it scales the length-normalised reward beta*l(y)/|y|; 0 gives no gradient and a "
                         "negative value prefers the rejected response"),
        "gamma": any_real("the target reward margin: it only shifts the logit"),
        "label_smoothing": DPO_LABEL_SMOOTHING,
    },
)
def simpo(
    lp: PairLogps, *, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0
) -> LossOutput:
    """SimPO: Bradley-Terry on length-averaged log-likelihoods with a target reward margin gamma."""
    mean_w, mean_l = pair_metrics.mean_logps(lp)
    logits = beta * (mean_w - mean_l) - gamma
    metrics = pair_metrics.reward_metrics(lp, beta * mean_w, beta * mean_l)
    return LossOutput(losses=_smoothed_sigmoid_loss(logits, label_smoothing), metrics=metrics)


@register(
    "orpo",
    inputs=PairLogps,
    requires=LENGTH_PAIR,
    paper="Hong et al. 2024, ORPO: Monolithic Preference Optimization without Reference Model (eqs. 6-7)",
    equation="-l(y_w)/|y_w| - lambda log sigma(log odds(y_w) - log odds(y_l)), "
    "odds(y) = P/(1-P), P = exp(l(y)/|y|)",
    domains={"beta": non_negative(
        "it weighs the odds-ratio term (the paper's lambda); a negative weight would prefer the rejected "
        "response")},
)
def orpo(lp: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """ORPO: token-mean SFT loss plus beta (the paper's lambda, TRL's beta) times the odds-ratio loss."""
    mean_w, mean_l = pair_metrics.mean_logps(lp)
    log_odds_ratio = logspace.log_odds(mean_w) - logspace.log_odds(mean_l)
    nll = -mean_w
    odds_ratio_loss = _neg_log_sigmoid(log_odds_ratio)
    metrics = pair_metrics.reward_metrics(lp, beta * mean_w, beta * mean_l)
    # TRL's names: `log_odds_ratio` is log sigma(log OR), `log_odds_chosen` is log OR itself.
    metrics["log_odds_ratio"] = _stop(-odds_ratio_loss)
    metrics["log_odds_chosen"] = _stop(log_odds_ratio)
    metrics["nll_loss"] = _stop(nll)
    return LossOutput(losses=nll + beta * odds_ratio_loss, metrics=metrics)


@register(
    "cpo",
    inputs=PairLogps,
    requires=("chosen_len",),
    paper="Xu et al. 2024, Contrastive Preference Optimization: Pushing the Boundaries of LLM "
    "Performance in Machine Translation (eq. 3; NLL as the authors' token-mean cross-entropy)",
    equation="-log sigma(beta l(y_w) - beta l(y_l)) + alpha * (-l(y_w)/|y_w|)",
    domains={"beta": POLICY_REWARD_BETA, "alpha": NLL_WEIGHT, "label_smoothing": DPO_LABEL_SMOOTHING},
)
def cpo(lp: PairLogps, *, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0) -> LossOutput:
    """CPO: DPO's form on raw sequence log-likelihoods plus alpha times the chosen token-mean NLL."""
    logp_w, logp_l = _sequence_logps(lp)
    nll = _token_mean_nll(lp.chosen, lp.chosen_len)
    preference = _smoothed_sigmoid_loss(beta * (logp_w - logp_l), label_smoothing)
    metrics = pair_metrics.reward_metrics(lp, beta * logp_w, beta * logp_l)
    metrics["nll_loss"] = _stop(nll)
    return LossOutput(losses=preference + alpha * nll, metrics=metrics)


@register(
    "cpo_simpo",
    inputs=PairLogps,
    requires=LENGTH_PAIR,
    paper="Xu et al. 2024, CPO-SimPO (github.com/fe1ixxu/CPO_SIMPO): SimPO's loss plus CPO's "
    "NLL term; TRL CPOTrainer loss_type='simpo'; defaults from the authors' Llama-3 recipe",
    equation="-log sigma(beta l(y_w)/|y_w| - beta l(y_l)/|y_l| - gamma) + alpha * (-l(y_w)/|y_w|)",
    domains={
        "beta": POLICY_REWARD_BETA,
        "gamma": any_real("the target reward margin: it only shifts the logit"),
        "alpha": NLL_WEIGHT,
        "label_smoothing": DPO_LABEL_SMOOTHING,
    },
)
def cpo_simpo(
    lp: PairLogps,
    *,
    beta: float = 10.0,
    gamma: float = 5.4,
    alpha: float = 0.05,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """CPO-SimPO: SimPO's length-normalised margin loss regularised by the chosen token-mean NLL."""
    mean_w, mean_l = pair_metrics.mean_logps(lp)
    preference = _smoothed_sigmoid_loss(beta * (mean_w - mean_l) - gamma, label_smoothing)
    nll = -mean_w
    metrics = pair_metrics.reward_metrics(lp, beta * mean_w, beta * mean_l)
    metrics["nll_loss"] = _stop(nll)
    return LossOutput(losses=preference + alpha * nll, metrics=metrics)


@register(
    "triple_po",
    inputs=PairLogps,
    requires=("gold", "gold_len"),
    paper="Saeidi et al. 2024, Triple Preference Optimization (TPO; sigmoid loss, gold-response NLL "
    "as the authors' token-mean cross-entropy; defaults from the authors' script and TRL's TPOConfig)",
    equation="-log sigma(beta l(y_w) - beta l(y_l)) + alpha * (-l(y_gold)/|y_gold|)",
    domains={"beta": POLICY_REWARD_BETA, "alpha": NLL_WEIGHT},
)
def triple_po(lp: PairLogps, *, beta: float = 0.01, alpha: float = 1.0) -> LossOutput:
    """TPO: CPO-style preference term on y_w vs y_l plus behavioural cloning of the gold response."""
    logp_w, logp_l = _sequence_logps(lp)
    nll = _token_mean_nll(lp.gold, lp.gold_len)
    metrics = pair_metrics.reward_metrics(lp, beta * logp_w, beta * logp_l)
    metrics["nll_loss"] = _stop(nll)
    metrics["logps/gold"] = _stop(logspace.f32(lp.gold))
    return LossOutput(losses=_neg_log_sigmoid(beta * (logp_w - logp_l)) + alpha * nll, metrics=metrics)


@register(
    "asft",
    inputs=PairLogps,
    requires=LENGTH_PAIR,
    paper="Wang et al. 2024, ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood "
    "(length-normalised probabilities)",
    equation="-l(y_w)/|y_w| - lambda [log sigma(log odds(y_w)) + log sigma(-log odds(y_l))], "
    "odds(y) = P/(1-P), P = exp(l(y)/|y|)",
    domains={"lambda_coef": non_negative(
        "it weighs the alignment term; a negative weight would push the chosen response's odds down and "
        "the rejected one's up")},
)
def asft(lp: PairLogps, *, lambda_coef: float = 0.1) -> LossOutput:
    """ASFT: token-mean SFT loss plus a pointwise (BCE) push of each response's odds, no Bradley-Terry."""
    mean_w, mean_l = pair_metrics.mean_logps(lp)
    odds_w, odds_l = logspace.log_odds(mean_w), logspace.log_odds(mean_l)
    # log sigma(log odds) = log P and log sigma(-log odds) = log(1 - P): a binary
    # cross-entropy labelling y_w "generate" and y_l "do not generate".
    align = _neg_log_sigmoid(odds_w) + _neg_log_sigmoid(-odds_l)
    nll = -mean_w
    metrics = pair_metrics.reward_metrics(lp, odds_w, odds_l)
    metrics["nll_loss"] = _stop(nll)
    metrics["asft/align_loss"] = _stop(align)
    return LossOutput(losses=nll + lambda_coef * align, metrics=metrics)


@register(
    "slic",
    inputs=PairLogps,
    paper="Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback (eq. 1; "
    "rank calibration loss, cross-entropy regularisation on the chosen response)",
    equation="max(0, delta - l(y_w) + l(y_l)) + lambda * (-l(y_w))",
    domains={
        "delta": any_real("the calibration hinge's margin: it only shifts the hinge"),
        "lambda_coef": NLL_WEIGHT,
    },
)
def slic(lp: PairLogps, *, delta: float = 1.0, lambda_coef: float = 0.1) -> LossOutput:
    """SLiC-HF: hinge on the unnormalised log-likelihood margin plus a sequence-level NLL regulariser."""
    logp_w, logp_l = _sequence_logps(lp)
    calibration = jax.nn.relu(delta - (logp_w - logp_l))
    nll = -logp_w
    metrics = pair_metrics.reward_metrics(lp, logp_w, logp_l)
    metrics["nll_loss"] = _stop(nll)
    metrics["slic/calibration_loss"] = _stop(calibration)
    return LossOutput(losses=calibration + lambda_coef * nll, metrics=metrics)


__all__ = ["asft", "cpo", "cpo_simpo", "orpo", "simpo", "slic", "triple_po"]
