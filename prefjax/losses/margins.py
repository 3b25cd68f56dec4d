"""DPO with a per-pair offset taken from external scores: ODPO and MODPO.

Both losses subtract a data-dependent margin from DPO's logit beta h:

  * ODPO (Amini et al. 2024) asks the chosen response to beat the rejected one by
    an offset that grows with how much better it is, Delta = alpha f(s_w - s_l);
  * MODPO (Zhou et al. 2024) trains one objective k of a multi-objective reward
    w^T r while the other objectives enter through frozen margin reward models
    r_{-k}, whose score gap (weighted by w_{-k}) is subtracted before rescaling
    by 1/w_k.

The scores are data (reward-model outputs, ratings), never differentiated.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from prefjax.losses import logspace, pair_metrics
from prefjax.losses.hparam_domains import KL_BETA, Choice, LeadingPositiveWeights, any_real
from prefjax.losses.registry import REFERENCE_PAIR, LossInputError, register
from prefjax.losses.types import LossOutput, PairLogps

Array = jax.Array

# log(s_w - s_l) needs a positive gap; ties and reversed pairs are clipped to this
# gap, i.e. an offset of alpha * log(1e-6) ~ -13.8 alpha: such pairs ask for almost
# no margin instead of producing -inf/NaN.
MIN_SCORE_GAP = 1e-6
SCALINGS = ("log", "identity")
OFFSET_SOURCES = ("scores", "margin")


def _require(lp: PairLogps, loss: str, fields: tuple[str, ...], why: str) -> None:
    for field in fields:
        if getattr(lp, field) is None:
            raise LossInputError(f"loss {loss!r} needs field {field!r} of PairLogps {why}, but it is None")


def _odpo_offset(lp: PairLogps, alpha: float, scaling: str, offset_from: str) -> Array:
    """Delta = alpha * f(s_w - s_l), or alpha * margin when offset_from="margin"."""
    if offset_from == "margin":
        _require(lp, "odpo", ("margin",), 'with offset_from="margin"')
        return alpha * logspace.f32(lp.margin)
    _require(lp, "odpo", ("score_chosen", "score_rejected"), 'with offset_from="scores"')
    if jnp.ndim(lp.score_chosen) != 1 or jnp.ndim(lp.score_rejected) != 1:
        raise LossInputError(
            f"loss 'odpo' needs one score per response: score_chosen/score_rejected of shape [B], "
            f"got {jnp.shape(lp.score_chosen)} and {jnp.shape(lp.score_rejected)}"
        )
    gap = logspace.f32(lp.score_chosen) - logspace.f32(lp.score_rejected)
    if scaling == "log":
        return alpha * jnp.log(jnp.maximum(gap, MIN_SCORE_GAP))
    return alpha * gap


@register(
    "odpo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR,
    uses=("score_chosen", "score_rejected", "margin"),
    paper="Amini et al. 2024, Direct Preference Optimization with an Offset (ODPO)",
    equation="-log sigma(beta h - Delta), Delta = alpha log(s_w - s_l) (or alpha * margin)",
    domains={
        "beta": KL_BETA,
        "alpha": any_real("it scales the offset alpha*f(s_w - s_l) that the margin must exceed; 0 is DPO"),
        "scaling": Choice(
            why="f of the offset alpha*f(s_w - s_l): the paper's log or its ablation's identity",
            choices=SCALINGS),
        "offset_from": Choice(why="where the offset comes from: the score columns or the margin column",
                              choices=OFFSET_SOURCES),
    },
)
def odpo(
    lp: PairLogps,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    scaling: str = "log",
    offset_from: str = "scores",
) -> LossOutput:
    """ODPO (Amini et al. 2024): DPO whose margin must exceed an offset set by the score gap.

    offset_from="scores" (needs score_chosen/score_rejected, [B]): Delta =
    alpha * f(s_w - s_l) with f = log (the paper's choice) or identity (its
    ablation); for f = log, gaps <= MIN_SCORE_GAP are clipped to it.
    offset_from="margin" (needs margin): Delta = alpha * margin, the column taken
    as an already-scaled offset. alpha = 0 is DPO.
    """
    rho_w, rho_l = pair_metrics.log_ratios(lp)
    offset = _odpo_offset(lp, alpha, scaling, offset_from)
    losses = logspace.neg_log_sigmoid(beta * (rho_w - rho_l) - offset)
    metrics = pair_metrics.reward_metrics(lp, beta * rho_w, beta * rho_l)
    metrics["odpo/offset"] = jax.lax.stop_gradient(offset)
    return LossOutput(losses=losses, metrics=metrics)


def _weighted_margin_scores(lp: PairLogps, weights: Sequence[float]) -> tuple[Array, Array]:
    """w_{-k}^T r_{-k}(y) for chosen and rejected; scores are [B] (M = 1) or [B, M]."""
    s_w, s_l = logspace.f32(lp.score_chosen), logspace.f32(lp.score_rejected)
    if s_w.ndim == 1:
        s_w, s_l = s_w[:, None], s_l[:, None]
    others = len(weights) - 1
    if s_w.shape[1] != others or s_l.shape[1] != others:
        raise LossInputError(
            f"loss 'modpo': weights={tuple(weights)} gives {others} margin objective(s) "
            f"(weights[1:]), but field 'score_chosen'/'score_rejected' has "
            f"{s_w.shape[1]}/{s_l.shape[1]} column(s) (shapes {jnp.shape(lp.score_chosen)}, "
            f"{jnp.shape(lp.score_rejected)}); pass len(weights) = M + 1"
        )
    w_others = jnp.asarray(weights[1:], jnp.float32)
    return s_w @ w_others, s_l @ w_others


@register(
    "modpo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR + ("score_chosen", "score_rejected"),
    paper="Zhou et al. 2024, Beyond One-Preference-Fits-All Alignment: Multi-Objective "
    "Direct Preference Optimization (MODPO)",
    equation="-log sigma((1/w_k) [beta h - w_{-k}^T (r_{-k}(y_w) - r_{-k}(y_l))])",
    domains={
        "beta": KL_BETA,
        "weights": LeadingPositiveWeights(
            why="the logit is divided by w_k, and w_1.. weigh the margin reward models' score gaps"),
    },
)
def modpo(lp: PairLogps, *, beta: float = 0.1, weights: tuple = (0.5, 0.5)) -> LossOutput:
    """MODPO (Zhou et al. 2024): DPO on objective k with the other objectives' rewards as a margin.

    weights[0] = w_k > 0 weighs the preference objective of the pairs;
    weights[1:] = w_{-k} weigh the M margin reward models whose scores are
    score_chosen/score_rejected ([B] for M = 1, or [B, M]). weights = (1, 0) is
    DPO. rewards/* are MODPO's own rewards (beta rho - w_{-k}^T r_{-k}) / w_k, as
    in the authors' trainer.
    """
    rho_w, rho_l = pair_metrics.log_ratios(lp)
    margin_w, margin_l = _weighted_margin_scores(lp, weights)
    w_k = float(weights[0])
    reward_w = (beta * rho_w - margin_w) / w_k
    reward_l = (beta * rho_l - margin_l) / w_k
    # The logit from h and the margin gap directly (not reward_w - reward_l): fewer roundings.
    logits = (beta * (rho_w - rho_l) - (margin_w - margin_l)) / w_k
    losses = logspace.neg_log_sigmoid(logits)
    metrics = pair_metrics.reward_metrics(lp, reward_w, reward_l)
    metrics["modpo/margin"] = jax.lax.stop_gradient(margin_w - margin_l)
    return LossOutput(losses=losses, metrics=metrics)
