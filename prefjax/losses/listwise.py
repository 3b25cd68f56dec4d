"""Listwise losses: K scored responses per prompt (LiPO-lambda, PRO, DPO's Plackett-Luce).

Notation (see README): rho(y) = log pi_theta(y|x) - log pi_ref(y|x); psi_i is
the quality score of slot i (`ListLogps.scores`, higher is better); sigma is
the logistic function.

Conventions shared by the three losses:
  * Slot i "beats" slot j when both are valid (mask 1) and psi_i > psi_j.
    Every ordering constraint comes from this relation, so ties in psi and
    padding slots impose none, and every loss is invariant to the order of
    the K slots. With distinct scores each loss is exactly its paper's
    equation over the responses sorted by psi.
  * Padding slots are replaced by 0 before any arithmetic (`where`, not a
    product), so -inf, NaN or -1e4 garbage there reaches neither the loss
    nor its gradient.
  * Per-example losses are sums over the prompt's ranking terms, as in the
    papers; nothing is divided by K or by the number of pairs.

Metrics use TRL's pair names for the best-scored valid response ("chosen")
against the worst-scored one ("rejected"), plus `list/pair_accuracy` (the
fraction of beating pairs whose implicit rewards are in the same order) and
`list/num_pairs`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import logspace
from prefjax.losses.hparam_domains import KL_BETA, NLL_WEIGHT, Flag
from prefjax.losses.registry import register
from prefjax.losses.types import ListLogps, LossOutput

Array = jax.Array
_stop = jax.lax.stop_gradient


def _valid(lp: ListLogps) -> Array:
    """[..., K] bool: real responses (all True when the list has no mask)."""
    if lp.mask is None:
        return jnp.ones(jnp.shape(lp.logps), bool)
    return jnp.asarray(lp.mask).astype(bool)


def _clean(x: Array, valid: Array, fill: float = 0.0) -> Array:
    """float32 copy of a [..., K] field with padding slots set to `fill`."""
    return jnp.where(valid, logspace.f32(x), fill)


def _beats(scores: Array, valid: Array) -> Array:
    """[..., K, K] bool: slot i beats slot j (both valid, psi_i > psi_j)."""
    both = valid[..., :, None] & valid[..., None, :]
    return both & (scores[..., :, None] > scores[..., None, :])


def _list_metrics(
    rewards: Array, logps: Array, scores: Array, valid: Array, beats: Array
) -> dict[str, Array]:
    """Best-vs-worst reward metrics under TRL's names, plus pair accuracy over the whole list."""
    rewards, logps = _stop(rewards), _stop(logps)
    best = jnp.argmax(jnp.where(valid, scores, -jnp.inf), axis=-1)[..., None]
    worst = jnp.argmin(jnp.where(valid, scores, jnp.inf), axis=-1)[..., None]
    chosen = jnp.take_along_axis(rewards, best, axis=-1)[..., 0]
    rejected = jnp.take_along_axis(rewards, worst, axis=-1)[..., 0]
    num_pairs = jnp.sum(beats, axis=(-2, -1)).astype(jnp.float32)
    ordered = beats & (rewards[..., :, None] > rewards[..., None, :])
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).astype(jnp.float32),
        "logps/chosen": jnp.take_along_axis(logps, best, axis=-1)[..., 0],
        "logps/rejected": jnp.take_along_axis(logps, worst, axis=-1)[..., 0],
        "list/pair_accuracy": jnp.sum(ordered, axis=(-2, -1)) / jnp.maximum(num_pairs, 1.0),
        "list/num_pairs": num_pairs,
    }


def _contrast_against_worse(logits_KxK: Array, beats: Array) -> Array:
    """sum_k [logsumexp_{j in {k} U worse(k)} z_kj - z_kk] over slots k that beat someone.

    `logits_KxK[..., k, j]` is the logit of candidate j in the softmax whose
    target is k. A slot that beats nobody (the last of the ranking, a tie
    group at the bottom, padding) contributes no term, as in the papers'
    sums that stop at n - 1.
    """
    own = jnp.diagonal(logits_KxK, axis1=-2, axis2=-1)
    # The diagonal is always included, so every row's logsumexp is finite; excluded
    # entries are set to the row's own logit so that no exp() of them can overflow.
    include = beats | jnp.eye(logits_KxK.shape[-1], dtype=bool)
    # Relative to the row's own logit before the logsumexp, not after: with large log-ratios
    # (|z| ~ 6000) lse(z) - z_kk would lose a small result (~1e-5) to float32 rounding.
    relative = jnp.where(include, logits_KxK - own[..., None], 0.0)
    lse = jax.nn.logsumexp(relative, axis=-1, where=include)
    terms = jnp.where(jnp.any(beats, axis=-1), lse, 0.0)
    return jnp.sum(terms, axis=-1)


def _rank_positions(s: Array, scores: Array, valid: Array) -> Array:
    """1-based rank of each slot when the valid slots are sorted by s, descending.

    Exact ties in s (every s is 0 while the policy equals its reference) are
    broken by the label (higher psi first), then by slot index, so the ranks
    do not depend on slot order except between fully interchangeable slots.
    """
    s_i, s_j = s[..., :, None], s[..., None, :]
    p_i, p_j = scores[..., :, None], scores[..., None, :]
    index = jnp.arange(s.shape[-1])
    earlier = index[None, :] < index[:, None]  # [i, j]: j < i
    ahead = (s_j > s_i) | ((s_j == s_i) & ((p_j > p_i) | ((p_j == p_i) & earlier)))
    return 1.0 + jnp.sum(ahead & valid[..., None, :], axis=-1).astype(jnp.float32)


@register(
    "lipo",
    inputs=ListLogps,
    requires=("ref_logps",),
    uses=("mask",),
    paper="Liu et al. 2024, LiPO: Listwise Preference Optimization through Learning-to-Rank "
    "(LiPO-lambda, Sec. 4; Lambda weight from Wang et al. 2018, LambdaLoss)",
    equation="sum_{psi_i > psi_j} -Delta_ij log sigma(s_i - s_j), s = beta rho, "
    "Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|, G = 2^psi - 1, D(tau) = ln(1 + tau), "
    "tau = rank of sg(s)",
    domains={"beta": KL_BETA},
)
def lipo(lp: ListLogps, *, beta: float = 0.05) -> LossOutput:
    """LiPO-lambda: DPO's pairwise logistic loss on every ordered pair, weighted by its DCG swap cost.

    Not normalised: the per-example loss is the plain sum over the prompt's
    ordered pairs (no division by the pair count or by the ideal DCG, which
    TF-Ranking's NDCG lambda weight would add). D uses the natural log, as
    written in the paper and in TF-Ranking (1 / log1p(rank)); a log2 discount
    only rescales every Delta by ln 2. Gains are 2^psi - 1, so scores should be
    on the paper's scale (win rates in [0, 1] or small ratings): psi above
    about 127 overflows float32.
    """
    valid = _valid(lp)
    scores = _clean(lp.scores, valid)
    rho = _clean(lp.logps, valid) - _clean(lp.ref_logps, valid)
    s = beta * rho
    beats = _beats(scores, valid)
    # Ranks come from the current model scores but carry no gradient: Delta is a weight.
    inv_discount = 1.0 / jnp.log1p(_rank_positions(_stop(s), scores, valid))
    gain = jnp.exp2(scores) - 1.0
    delta = _stop(
        jnp.abs(gain[..., :, None] - gain[..., None, :])
        * jnp.abs(inv_discount[..., :, None] - inv_discount[..., None, :])
    )
    pair_losses = delta * logspace.neg_log_sigmoid(s[..., :, None] - s[..., None, :])
    losses = jnp.sum(jnp.where(beats, pair_losses, 0.0), axis=(-2, -1))
    metrics = _list_metrics(s, _clean(lp.logps, valid), scores, valid, beats)
    metrics["lipo/lambda_weight_sum"] = jnp.sum(jnp.where(beats, delta, 0.0), axis=(-2, -1))
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "pro",
    inputs=ListLogps,
    requires=("lengths",),
    uses=("mask",),
    paper="Song et al. 2024, Preference Ranking Optimization for Human Alignment (PRO, AAAI; "
    "eqs. for L_PRO, dynamic temperature and L_SFT; defaults from the paper and authors' code)",
    equation="sum_{k<n} -log[exp(s_k t_kk) / sum_{i>=k} exp(s_i t_ki)] "
    "+ sft_weight (n-1)^2 (-log pi_theta(y^1|x)), s = log pi_theta(y|x)/|y|, "
    "t_ki = psi_k - psi_i, t_kk = max_{i>k} t_ki (t = 1 without dynamic temperature)",
    domains={
        "sft_weight": NLL_WEIGHT,
        "dynamic_temperature": Flag(why="it switches the paper's score-gap temperature on or off"),
    },
)
def pro(lp: ListLogps, *, sft_weight: float = 0.05, dynamic_temperature: bool = True) -> LossOutput:
    """PRO: nested softmax contrasts of length-averaged log-likelihoods down the ranking, plus SFT on y^1.

    The paper's temperature T_k^i = 1 / (psi_k - psi_i) enters as a product
    (s_i * (psi_k - psi_i)), never a division, so tied or nearly tied scores
    stay finite. The SFT weight is the paper's beta = 0.05 (n - 1)^2 with n
    the number of valid responses; its NLL is the sequence-sum -log pi(y^1|x),
    as in the authors' code. When several valid responses share the top
    score, the NLL is averaged over them.
    """
    valid = _valid(lp)
    scores = _clean(lp.scores, valid)
    logps = _clean(lp.logps, valid)
    s = logspace.safe_divide(logps, _clean(lp.lengths, valid, fill=1.0))
    beats = _beats(scores, valid)

    gaps = scores[..., :, None] - scores[..., None, :]  # [..., k, i] = psi_k - psi_i
    worse_gaps = jnp.where(beats, gaps, 0.0)
    eye = jnp.eye(s.shape[-1], dtype=bool)
    # Target temperature: 1/T_k^k = max_i 1/T_k^i over the slots k beats.
    dynamic = jnp.where(eye, jnp.max(worse_gaps, axis=-1, keepdims=True), worse_gaps)
    multiplier = jnp.where(dynamic_temperature, dynamic, 1.0)
    ranking_loss = _contrast_against_worse(s[..., None, :] * multiplier, beats)

    is_top = valid & (scores == jnp.max(jnp.where(valid, scores, -jnp.inf), axis=-1, keepdims=True))
    top_count = jnp.sum(is_top, axis=-1).astype(jnp.float32)
    nll_top = -logspace.safe_divide(jnp.sum(jnp.where(is_top, logps, 0.0), axis=-1), top_count)
    n_valid = jnp.sum(valid, axis=-1).astype(jnp.float32)
    sft_beta = sft_weight * jnp.maximum(n_valid - 1.0, 0.0) ** 2
    losses = ranking_loss + sft_beta * nll_top

    metrics = _list_metrics(s, logps, scores, valid, beats)
    metrics["pro/ranking_loss"] = _stop(ranking_loss)
    metrics["nll_loss"] = _stop(nll_top)
    return LossOutput(losses=losses, metrics=metrics)


@register(
    "plackett_luce",
    inputs=ListLogps,
    requires=("ref_logps",),
    uses=("mask",),
    paper="Rafailov et al. 2023, Direct Preference Optimization (Appendix A.3, eq. 18: Plackett-Luce)",
    equation="sum_{k<K} -log[exp(beta rho(y_(k))) / sum_{j>=k} exp(beta rho(y_(j)))], y_(1..K) sorted by psi",
    domains={"beta": KL_BETA},
)
def plackett_luce(lp: ListLogps, *, beta: float = 0.1) -> LossOutput:
    """DPO under the Plackett-Luce ranking model: each response must win a softmax over those below it.

    Ties: a response's softmax contains itself and the responses it strictly
    beats, so tied responses never compete with each other and no
    tie-breaking order is needed (with distinct scores this is eq. 18).
    """
    valid = _valid(lp)
    scores = _clean(lp.scores, valid)
    s = beta * (_clean(lp.logps, valid) - _clean(lp.ref_logps, valid))
    beats = _beats(scores, valid)
    logits = jnp.broadcast_to(s[..., None, :], beats.shape)
    losses = _contrast_against_worse(logits, beats)
    return LossOutput(losses=losses, metrics=_list_metrics(s, _clean(lp.logps, valid), scores, valid, beats))
