"""Losses for online and iterative preference learning: SPPO, INPO, XPO, Nash-MD, HyPO.

Each is a per-example loss on responses sampled during training (prefjax.online builds
the batches). Notation as in the README: rho(y) = log pi_theta(y|x) - log pi_ref(y|x),
summed over response tokens; h = rho(y_w) - rho(y_l); sg = stop-gradient; pi_t is the
previous iterate (the policy that drew the samples). Which role "reference" plays is
the caller's choice: SPPO's reference is pi_t (a reference refreshed every round),
INPO reads pi_ref and pi_t separately.

Two of them (Nash-MD, HyPO) contain score-function surrogates: terms whose *value*
means little but whose *gradient* is an unbiased policy-gradient estimate on a
response sampled from the policy itself. For y ~ pi_theta,

    grad E_y[f(y)] = E_y[f(y) grad log pi_theta(y)]        (f not depending on theta),
    grad KL(pi_theta || pi_ref) = E_y[rho(y) grad log pi_theta(y)]

(the second because E_y[grad log pi_theta(y)] = 0), so sg(f) * log pi_theta(y) and
sg(rho) * log pi_theta(y) are single-sample surrogates. They are only correct on
responses drawn from the current policy (or a close iterate, as in an online round).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import logspace, pair_metrics
from prefjax.losses.hparam_domains import KL_BETA, non_negative, positive
from prefjax.losses.pairwise import dpo
from prefjax.losses.registry import REFERENCE_PAIR, register
from prefjax.losses.types import LossOutput, PairLogps, UnpairedLogps

Array = jax.Array
_f32 = logspace.f32
_sg = jax.lax.stop_gradient


# ------------------------------------------------------------------------------ SPPO


@register(
    "sppo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR + ("score_chosen", "score_rejected"),
    paper="Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment "
    "(eq. 4.8 / Alg. 1; the reference is the previous iterate pi_t, eta = 1/beta with the authors' beta = 1e-3)",
    equation="(rho_w - eta (P_w - 1/2))^2 + (rho_l - eta (P_l - 1/2))^2; "
    "P = score = estimated win rate against pi_t",
    domains={"eta": positive(
        "eta scales the target log-ratio eta*(P - 1/2): 0 makes the target 0 whatever the preference, "
        "and a negative value pushes winners down")},
)
def sppo(lp: PairLogps, *, eta: float = 1000.0) -> LossOutput:
    """SPPO: each response's log-ratio against pi_t regressed onto eta * (its win rate - 1/2).

    Wu et al.'s update is pi_{t+1}(y) ∝ pi_t(y) exp(eta P(y > pi_t)), so
    log(pi_{t+1}(y) / pi_t(y)) = eta (P(y > pi_t) - 1/2) up to the normaliser, which the
    paper approximates by eta/2 (P(pi_t > pi_t) = 1/2). `score_chosen`/`score_rejected`
    hold the estimated win probabilities P_hat(y) in [0, 1] (prefjax.online.pairs.win_rates:
    the mean of P(y > y_j) over the other samples). With P_w = 1, P_l = 0 this is
    `sppo_hard` with beta = 1/eta.

    Sign conventions: a response that wins more than half its comparisons gets a positive
    target log-ratio (its probability goes up), one that loses gets a negative one. The
    default eta = 1000 is the authors' scripts' beta = 1e-3 (sequence-level log-ratios);
    `sppo_hard`'s default beta = 0.1 corresponds to eta = 10. Rewards in the metrics are
    rho / eta, the implied P - 1/2.
    """
    rho_w, rho_l = pair_metrics.log_ratios(lp)
    target_w = eta * (_f32(lp.score_chosen) - 0.5)
    target_l = eta * (_f32(lp.score_rejected) - 0.5)
    losses = (rho_w - target_w) ** 2 + (rho_l - target_l) ** 2
    metrics = pair_metrics.reward_metrics(lp, rho_w / eta, rho_l / eta)
    metrics["sppo/target_chosen"] = _sg(target_w)
    metrics["sppo/target_rejected"] = _sg(target_l)
    return LossOutput(losses=losses, metrics=metrics)


# ------------------------------------------------------------------------------ INPO


@register(
    "inpo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR + ("prev_chosen", "prev_rejected"),
    paper="Zhang et al. 2024, Iterative Nash Policy Optimization: Aligning LLMs with General Preferences "
    "via No-Regret Learning (the loss whose minimiser is the online-mirror-descent step; derivation in "
    "prefjax.losses.online.inpo)",
    equation="(log pi(y_w)/pi(y_l) - eta tau log piref(y_w)/piref(y_l) - (1 - eta tau) log pi_t(y_w)/pi_t(y_l) "
    "- eta/2)^2",
    domains={
        "eta": positive("eta is the mirror-descent step size: the target margin is eta/2, and 0 would "
                        "leave the policy where it is"),
        "tau": non_negative("tau is the KL(pi || pi_ref) regularisation of the preference game; a negative "
                            "value would reward moving away from the reference"),
    },
)
def inpo(lp: PairLogps, *, eta: float = 10.0, tau: float = 0.01) -> LossOutput:
    """INPO: a squared loss whose population minimiser is one step of online mirror descent.

    The paper's OMD step on the KL-regularised preference game (regulariser tau,
    step size eta) is

        pi_{t+1}(y) ∝ pi_t(y)^(1 - eta tau) pi_ref(y)^(eta tau) exp(eta P(y > pi_t)),

    so for any two responses, with h_t(y, y') = log pi(y)/pi(y') - eta tau log pi_ref(y)/pi_ref(y')
    - (1 - eta tau) log pi_t(y)/pi_t(y'), the step is pi = pi_{t+1} exactly when
    h_t(y, y') = eta [P(y > pi_t) - P(y' > pi_t)] for all pairs.

    Derivation of the loss: draw y, y' ~ pi_t and a preference label I ~ Bernoulli(P(y > y')),
    and name the winner y_w. The loss (h_t(y_w, y_l) - eta/2)^2 equals
    I (h - eta/2)^2 + (1 - I)(h + eta/2)^2 with h = h_t(y, y') (h_t is antisymmetric); its
    expectation over I is h^2 - eta h (2 P(y > y') - 1) + eta^2/4, i.e. (up to a constant) a
    least-squares regression of h onto eta (P(y > y') - 1/2). Among h of the form
    f(y) - f(y') (any policy gives such an h), the least-squares fit over y, y' ~ pi_t is
    f = eta P(. > pi_t) + c: the residual r = eta [P(y > y') - 1/2 - P(y > pi_t) + P(y' > pi_t)]
    has E[r | y] = eta [E_{y'} P(y' > pi_t) - 1/2] = eta [P(pi_t > pi_t) - 1/2] = 0, and likewise
    E[r | y'] = 0, so r is orthogonal to every g(y) - g(y'). Hence the minimiser is the OMD step,
    and no per-response win rate is needed: only pairs from pi_t with a label.

    Parametrisation: `eta` is the OMD step size and `tau` the KL regularisation, as in the
    paper; eta tau in [0, 1] is the weight of the reference in the target (eta tau = 1: IPO
    against pi_ref with beta = 1/eta; eta tau = 0: SPPO-like self-play against pi_t only).
    Values of eta tau above 1 are accepted and extrapolate past the reference.
    `prev_chosen`/`prev_rejected` are log pi_t (Batch.sampler_logps), `ref_*` log pi_ref.
    The defaults are this library's choice (no public code): eta = 10 gives IPO's target
    1/(2 beta) at beta = 0.1, and tau = 0.01 puts weight eta tau = 0.1 on the reference.
    Rewards in the metrics are each response's implied win rate (up to a shared constant),
    [log pi - eta tau log pi_ref - (1 - eta tau) log pi_t] / eta; their margin's target is 1/2.
    """
    mix = eta * tau
    chosen, rejected = _f32(lp.chosen), _f32(lp.rejected)
    # Each response's anchor: the geometric mixture pi_ref^(eta tau) pi_t^(1 - eta tau), in log space.
    anchor_w = mix * _f32(lp.ref_chosen) + (1.0 - mix) * _f32(lp.prev_chosen)
    anchor_l = mix * _f32(lp.ref_rejected) + (1.0 - mix) * _f32(lp.prev_rejected)
    implied_w, implied_l = chosen - anchor_w, rejected - anchor_l
    h_t = implied_w - implied_l
    losses = (h_t - 0.5 * eta) ** 2
    metrics = pair_metrics.reward_metrics(lp, implied_w / eta, implied_l / eta)
    return LossOutput(losses=losses, metrics=metrics)


# ------------------------------------------------------------------------------- XPO


@register(
    "xpo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR + ("chosen_from_reference", "rejected_from_reference"),
    paper="Xie et al. 2024, Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation "
    "for Sample-Efficient RLHF (Alg. 1; alpha default as in TRL's XPOTrainer)",
    equation="-log sigma(beta h) + alpha [log pi(y_w) 1(y_w ~ pi_ref) + log pi(y_l) 1(y_l ~ pi_ref)]",
    domains={
        "beta": KL_BETA,
        "alpha": non_negative("alpha weighs the optimism bonus that lowers the likelihood of the "
                              "reference's samples; a negative value would pull the policy back to them"),
    },
)
def xpo(lp: PairLogps, *, beta: float = 0.1, alpha: float = 1e-5) -> LossOutput:
    """XPO: online DPO plus an exploration bonus, alpha * log pi_theta(y~) for y~ ~ pi_ref.

    Each pair holds one response from the current policy and one from the reference,
    ordered by the preference label; `chosen_from_reference`/`rejected_from_reference`
    (Batch.origin == reference) say which one is y~. Minimising alpha log pi_theta(y~)
    lowers the probability of what the reference would say, pushing the policy to explore
    outside the reference's support (the paper's optimism; its "one-line change to online
    DPO"). The term uses the policy log-prob itself, not the log-ratio. The paper leaves
    alpha open; 1e-5 is TRL's default.
    """
    out = dpo(lp, beta=beta)
    from_ref_w = _f32(lp.chosen_from_reference)
    from_ref_l = _f32(lp.rejected_from_reference)
    # where, not a product: a response not from the reference contributes nothing even at -inf log-prob.
    exploration = (jnp.where(from_ref_w > 0, from_ref_w * _f32(lp.chosen), 0.0)
                   + jnp.where(from_ref_l > 0, from_ref_l * _f32(lp.rejected), 0.0))
    metrics = dict(out.metrics)
    metrics["xpo/exploration"] = _sg(exploration)
    return LossOutput(losses=out.losses + alpha * exploration, metrics=metrics)


# --------------------------------------------------------------------------- Nash-MD


@register(
    "nash_md",
    inputs=UnpairedLogps,
    requires=("ref_logps", "score"),
    paper="Munos et al. 2023, Nash Learning from Human Feedback (Nash-MD-PG: policy gradient of "
    "P(pi > pi_mix) - beta KL(pi || pi_ref), y' from the token-level geometric mixture)",
    equation="beta sg(rho) log pi(y) - (p - 1/2) log pi(y), y ~ pi; p = score = P(y > y')",
    domains={"beta": non_negative(
        "beta weighs the KL(pi || pi_ref) penalty; a negative value would reward moving away from the "
        "reference")},
)
def nash_md(up: UnpairedLogps, *, beta: float = 0.1) -> LossOutput:
    """Nash-MD's policy-gradient step as a score-function surrogate on policy samples.

    For y ~ pi_theta and an opponent y' ~ pi_mix (the normalised token-level geometric
    mixture pi^(1-c) pi_ref^c, prefjax.sampling's mixture_params), the objective
    P(pi_theta > pi_mix) - beta KL(pi_theta || pi_ref) has gradient
    E_y[(p - 1/2) grad log pi(y)] - beta E_y[rho(y) grad log pi(y)] with p = P(y > y')
    (1/2 is a baseline: E_y[grad log pi(y)] = 0). The loss is minus its surrogate:
    d loss / d log pi(y) = beta rho(y) - (p - 1/2). A sample that beats its opponent
    (p > 1/2) is made likelier, one that loses less likely, and the KL term pulls back
    towards the reference.

    The KL term is the sequence-level estimator sg(sum_t rho_t) * sum_t log pi_t; TRL's
    NashMDTrainer uses the per-token sum_t sg(rho_t) log pi_t instead. The `label` column is
    not read. The loss value is a surrogate (its gradient is what matters); the metrics
    report the KL estimate rho and the win probability p.
    """
    logps = _f32(up.logps)
    rho = logps - _f32(up.ref_logps)
    p = _f32(up.score)
    losses = beta * _sg(rho) * logps - _sg(p - 0.5) * logps
    metrics = {
        "rewards": _sg(beta * rho),
        "logps": _sg(logps),
        "nash_md/kl": _sg(rho),
        "nash_md/win_prob": _sg(p),
    }
    return LossOutput(losses=losses, metrics=metrics)


# ------------------------------------------------------------------------------ HyPO


@register(
    "hypo",
    inputs=PairLogps,
    requires=REFERENCE_PAIR + ("sample", "ref_sample"),
    paper="Song et al. 2024, The Importance of Online Data: Understanding Preference Fine-tuning via "
    "Coverage (HyPO, Alg. 1: offline DPO plus a reverse KL on online samples)",
    equation="-log sigma(beta h) + lam sg(rho(y)) log pi(y), y ~ pi (a fresh policy sample)",
    domains={
        "beta": KL_BETA,
        "lam": non_negative("lam weighs the reverse KL(pi || pi_ref) estimated on the policy's own "
                            "samples; a negative value would reward drifting from the reference"),
    },
)
def hypo(lp: PairLogps, *, beta: float = 0.1, lam: float = 0.01) -> LossOutput:
    """HyPO: DPO on the offline pair plus lam * KL(pi_theta || pi_ref) on a fresh policy sample.

    The offline pair (y_w, y_l) gets DPO's contrastive loss; the KL, whose gradient is
    E_{y ~ pi_theta}[rho(y) grad log pi_theta(y)], enters as the score-function surrogate
    sg(rho(y)) log pi_theta(y) on the sample y (`sample`/`ref_sample`: response 3 of a K = 3
    pair batch). The paper's point: the KL on online samples only needs partial coverage,
    while the offline contrastive term alone does not control the policy off the data.
    No public code; lam = 0.01 is this library's default (a tenth of beta). The metric
    `hypo/kl` is the single-sample KL estimate rho(y).
    """
    out = dpo(lp, beta=beta)
    sample = _f32(lp.sample)
    rho = sample - _f32(lp.ref_sample)
    metrics = dict(out.metrics)
    metrics["hypo/kl"] = _sg(rho)
    return LossOutput(losses=out.losses + lam * _sg(rho) * sample, metrics=metrics)
