"""The online losses (SPPO, INPO, XPO, Nash-MD, HyPO) against their papers, and the batch path to them.

Expected values are written here in float64 numpy from each paper's equation; gradients
are checked against derivatives worked out by hand; INPO's loss is checked to have the
online-mirror-descent step as its population minimiser on a small discrete game; the
limits (alpha = 0, lam = 0, eta tau = 1, hard win rates) reduce to the offline losses;
and prefjax.train.loss_inputs fills the new fields from an online Batch's columns.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.batch import ORIGIN_DATA, ORIGIN_POLICY, ORIGIN_REFERENCE
from prefjax.data import synthetic_batches
from prefjax.losses import registry, types
from prefjax.scoring import Scores
from prefjax.train import loss_inputs
from tests.losses.numpy_ref import as64, log_sigmoid, sigmoid

B = 6


def _pairs(seed: int = 0, b: int = B, **overrides) -> types.PairLogps:
    """Random pairs with every online field filled (win probabilities in [0, 1])."""
    rng = np.random.default_rng(seed)
    logp = lambda: rng.uniform(-40.0, -5.0, b)  # noqa: E731
    fields = dict(chosen=logp(), rejected=logp(), ref_chosen=logp(), ref_rejected=logp(),
                  prev_chosen=logp(), prev_rejected=logp(), sample=logp(), ref_sample=logp(),
                  score_chosen=rng.uniform(0, 1, b), score_rejected=rng.uniform(0, 1, b),
                  chosen_from_reference=(np.arange(b) % 3 == 0).astype(np.float32),
                  rejected_from_reference=(np.arange(b) % 3 == 1).astype(np.float32))
    fields.update(overrides)
    return types.PairLogps(**{k: jnp.asarray(v, jnp.float32) for k, v in fields.items()})


def _unpaired(seed: int = 0, b: int = B, **overrides) -> types.UnpairedLogps:
    rng = np.random.default_rng(seed)
    fields = dict(logps=rng.uniform(-40.0, -5.0, b), ref_logps=rng.uniform(-40.0, -5.0, b),
                  score=rng.uniform(0, 1, b))
    fields.update(overrides)
    return types.UnpairedLogps(label=jnp.ones(b, bool), **{k: jnp.asarray(v, jnp.float32) for k, v in fields.items()})


def _grad_of_mean(name, inputs, fields, **hparams):
    """d mean_b loss_b / d field for each policy-side field."""
    spec = losses.get(name)

    def mean_loss(policy):
        return jnp.mean(spec(dataclasses.replace(inputs, **policy), **hparams).losses)

    return jax.grad(mean_loss)({f: getattr(inputs, f) for f in fields})


# ------------------------------------------------------------------- values (numpy refs)


def ref_sppo(lp, eta):
    """Wu et al. eq. 4.8: (log pi/pi_t (y) - eta (P_hat(y) - 1/2))^2 for y_w and y_l."""
    rho_w = as64(lp.chosen) - as64(lp.ref_chosen)
    rho_l = as64(lp.rejected) - as64(lp.ref_rejected)
    return (rho_w - eta * (as64(lp.score_chosen) - 0.5)) ** 2 + (rho_l - eta * (as64(lp.score_rejected) - 0.5)) ** 2


def inpo_residual(lp, eta, tau):
    """Zhang et al.: the OMD step pi_{t+1} ∝ pi_t^(1 - eta tau) pi_ref^(eta tau) exp(eta P(y > pi_t)) fixes
    log pi(y_w)/pi(y_l) = (1 - eta tau) log pi_t ratio + eta tau log pi_ref ratio + eta [P_w - P_l]; the
    labelled-pair loss replaces eta [P_w - P_l] by its label-conditional target eta/2."""
    log_ratio = as64(lp.chosen) - as64(lp.rejected)
    omd_anchor = (1 - eta * tau) * (as64(lp.prev_chosen) - as64(lp.prev_rejected)) \
        + eta * tau * (as64(lp.ref_chosen) - as64(lp.ref_rejected))
    return log_ratio - omd_anchor - eta / 2


def ref_inpo(lp, eta, tau):
    return inpo_residual(lp, eta, tau) ** 2


def ref_dpo(lp, beta):
    h = (as64(lp.chosen) - as64(lp.ref_chosen)) - (as64(lp.rejected) - as64(lp.ref_rejected))
    return -log_sigmoid(beta * h)


def ref_xpo(lp, beta, alpha):
    """Xie et al. Alg. 1: DPO + alpha * log pi(y~) for the response y~ drawn from pi_ref."""
    explore = as64(lp.chosen) * as64(lp.chosen_from_reference) + as64(lp.rejected) * as64(lp.rejected_from_reference)
    return ref_dpo(lp, beta) + alpha * explore


def ref_nash_md(up, beta):
    """Munos et al. Nash-MD-PG surrogate: beta sg(rho) log pi - (p - 1/2) log pi (value at the point)."""
    logp = as64(up.logps)
    return beta * (logp - as64(up.ref_logps)) * logp - (as64(up.score) - 0.5) * logp


def ref_hypo(lp, beta, lam):
    """Song et al. HyPO: DPO + lam * [rho(y) log pi(y)] on the online sample (surrogate's value)."""
    s = as64(lp.sample)
    return ref_dpo(lp, beta) + lam * (s - as64(lp.ref_sample)) * s


VALUE_CASES = [
    ("sppo", _pairs, ref_sppo, {"eta": 1000.0}),
    ("sppo", _pairs, ref_sppo, {"eta": 3.0}),
    ("inpo", _pairs, ref_inpo, {"eta": 10.0, "tau": 0.01}),
    ("inpo", _pairs, ref_inpo, {"eta": 2.0, "tau": 0.3}),
    ("xpo", _pairs, ref_xpo, {"beta": 0.1, "alpha": 1e-5}),
    ("xpo", _pairs, ref_xpo, {"beta": 0.5, "alpha": 0.3}),
    ("nash_md", _unpaired, ref_nash_md, {"beta": 0.1}),
    ("nash_md", _unpaired, ref_nash_md, {"beta": 0.02}),
    ("hypo", _pairs, ref_hypo, {"beta": 0.1, "lam": 0.01}),
    ("hypo", _pairs, ref_hypo, {"beta": 0.3, "lam": 0.5}),
]


@pytest.mark.parametrize("name, make, ref, hparams", VALUE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(VALUE_CASES)])
def test_value_matches_the_papers_equation(name, make, ref, hparams):
    for seed in range(3):
        inputs = make(seed)
        got = np.asarray(losses.get(name)(inputs, **hparams).losses, np.float64)
        want = ref(inputs, **hparams)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * max(1.0, np.abs(want).max()))


def test_defaults_are_the_documented_ones():
    assert losses.get("sppo").hparam_defaults == {"eta": 1000.0}
    assert losses.get("inpo").hparam_defaults == {"eta": 10.0, "tau": 0.01}
    assert losses.get("xpo").hparam_defaults == {"beta": 0.1, "alpha": 1e-5}
    assert losses.get("nash_md").hparam_defaults == {"beta": 0.1}
    assert losses.get("hypo").hparam_defaults == {"beta": 0.1, "lam": 0.01}


# ------------------------------------------------------------------ gradients by hand


def test_sppo_gradient_is_twice_the_residual():
    lp, eta = _pairs(1), 7.0
    g = _grad_of_mean("sppo", lp, ("chosen", "rejected"), eta=eta)
    rho_w = as64(lp.chosen) - as64(lp.ref_chosen)
    rho_l = as64(lp.rejected) - as64(lp.ref_rejected)
    np.testing.assert_allclose(g["chosen"], 2 * (rho_w - eta * (as64(lp.score_chosen) - 0.5)) / B, rtol=1e-5)
    np.testing.assert_allclose(g["rejected"], 2 * (rho_l - eta * (as64(lp.score_rejected) - 0.5)) / B, rtol=1e-5)


def test_inpo_gradient_is_twice_the_margin_residual_with_opposite_signs():
    lp, eta, tau = _pairs(2), 4.0, 0.1
    g = _grad_of_mean("inpo", lp, ("chosen", "rejected"), eta=eta, tau=tau)
    residual = inpo_residual(lp, eta, tau)
    np.testing.assert_allclose(g["chosen"], 2 * residual / B, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g["rejected"], -2 * residual / B, rtol=1e-4, atol=1e-6)


def test_xpo_gradient_is_dpos_plus_alpha_on_the_reference_sample():
    lp, beta, alpha = _pairs(3), 0.2, 0.05
    g = _grad_of_mean("xpo", lp, ("chosen", "rejected"), beta=beta, alpha=alpha)
    h = (as64(lp.chosen) - as64(lp.ref_chosen)) - (as64(lp.rejected) - as64(lp.ref_rejected))
    dpo_w = -beta * sigmoid(-beta * h)  # d/dz -log sigma(beta z) at z = h
    np.testing.assert_allclose(g["chosen"], (dpo_w + alpha * as64(lp.chosen_from_reference)) / B, rtol=1e-5)
    np.testing.assert_allclose(g["rejected"], (-dpo_w + alpha * as64(lp.rejected_from_reference)) / B, rtol=1e-5)


def test_nash_md_gradient_is_beta_rho_minus_advantage():
    up, beta = _unpaired(4), 0.3
    g = _grad_of_mean("nash_md", up, ("logps",), beta=beta)["logps"]
    rho = as64(up.logps) - as64(up.ref_logps)
    np.testing.assert_allclose(g, (beta * rho - (as64(up.score) - 0.5)) / B, rtol=1e-5, atol=1e-7)


def test_hypo_gradient_on_the_sample_is_lam_rho_not_the_kl_values_derivative():
    lp, beta, lam = _pairs(5), 0.1, 0.2
    g = _grad_of_mean("hypo", lp, ("chosen", "rejected", "sample"), beta=beta, lam=lam)
    rho_s = as64(lp.sample) - as64(lp.ref_sample)
    # The score-function surrogate: lam * rho, not d/ds [lam (s - ref) s] = lam (2 s - ref).
    np.testing.assert_allclose(g["sample"], lam * rho_s / B, rtol=1e-5)
    h = (as64(lp.chosen) - as64(lp.ref_chosen)) - (as64(lp.rejected) - as64(lp.ref_rejected))
    np.testing.assert_allclose(g["chosen"], -beta * sigmoid(-beta * h) / B, rtol=1e-5)


def _score_function_gradient(logits, ref_logp, payoff, beta):
    """Exact d/d logits of sum_y pi(y) payoff(y) - beta KL(pi || ref) for pi = softmax(logits)."""
    pi = np.exp(logits - np.log(np.exp(logits).sum()))
    f = payoff - beta * (np.log(pi) - ref_logp)
    return pi * (f - pi @ f)  # the softmax Jacobian; the KL's own +1 cancels in it


def test_nash_md_surrogate_averages_to_the_exact_policy_gradient():
    """On a 5-response policy, sum_y pi(y) * d loss/d logits (the expectation over samples) is
    minus the exact gradient of P(y > y') - beta KL: the surrogate is an unbiased estimator."""
    rng = np.random.default_rng(0)
    logits, ref_logp = rng.normal(size=5), np.log(rng.dirichlet(np.ones(5)))
    win, beta = rng.uniform(0, 1, 5), 0.4  # P(y > y'), y' from a fixed opponent (the mixture)

    def surrogate(theta, y):
        logp = jax.nn.log_softmax(theta)
        up = types.UnpairedLogps(logps=logp[y][None], label=jnp.ones(1, bool), ref_logps=jnp.asarray(ref_logp)[y][None],
                                 score=jnp.asarray(win)[y][None])
        return losses.get("nash_md")(up, beta=beta).losses[0]

    theta = jnp.asarray(logits, jnp.float32)
    pi = np.asarray(jax.nn.softmax(theta), np.float64)
    expected = sum(pi[y] * np.asarray(jax.grad(surrogate)(theta, y), np.float64) for y in range(5))
    np.testing.assert_allclose(-expected, _score_function_gradient(logits, ref_logp, win, beta), atol=1e-5)


def test_hypo_kl_term_averages_to_the_exact_reverse_kl_gradient():
    rng = np.random.default_rng(1)
    logits, ref_logp, lam = rng.normal(size=4), np.log(rng.dirichlet(np.ones(4))), 0.7
    zeros = jnp.zeros(1)

    def kl_part(theta, y):
        logp = jax.nn.log_softmax(theta)
        lp = types.PairLogps(chosen=zeros, rejected=zeros, ref_chosen=zeros, ref_rejected=zeros,
                             sample=logp[y][None], ref_sample=jnp.asarray(ref_logp, jnp.float32)[y][None])
        return losses.get("hypo")(lp, lam=lam).losses[0]

    theta = jnp.asarray(logits, jnp.float32)
    pi = np.asarray(jax.nn.softmax(theta), np.float64)
    expected = sum(pi[y] * np.asarray(jax.grad(kl_part)(theta, y), np.float64) for y in range(4))
    # gradient of lam * KL(pi || ref) = -(score-function gradient with no payoff and beta = lam)
    np.testing.assert_allclose(expected, -_score_function_gradient(logits, ref_logp, np.zeros(4), lam), atol=1e-5)


# --------------------------------------------------------------- INPO's minimiser is OMD


def test_inpo_population_minimiser_is_the_mirror_descent_step():
    """On 4 responses with an intransitive preference, minimising INPO's expected loss over pairs
    y, y' ~ pi_t labelled by P gives pi_{t+1} ∝ pi_t^(1 - eta tau) pi_ref^(eta tau) exp(eta P(y > pi_t))."""
    rng = np.random.default_rng(2)
    n, eta, tau = 4, 1.5, 0.2
    upper = rng.uniform(0, 1, (n, n))
    pref = np.triu(upper, 1) + np.tril(1 - upper.T, -1) + 0.5 * np.eye(n)  # P[i, j] + P[j, i] = 1
    pi_t, pi_ref = rng.dirichlet(np.full(n, 3.0)), rng.dirichlet(np.full(n, 3.0))
    win_i, lose_j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    win_i, lose_j = win_i.ravel(), lose_j.ravel()
    # Ordered (winner, loser) pairs weighted by P(draw y, y') * P(label says this one won).
    weight = jnp.asarray(pi_t[win_i] * pi_t[lose_j] * pref[win_i, lose_j], jnp.float32)
    prev, ref = jnp.log(jnp.asarray(pi_t, jnp.float32)), jnp.log(jnp.asarray(pi_ref, jnp.float32))

    def expected_loss(theta):
        logp = jax.nn.log_softmax(theta)
        lp = types.PairLogps(chosen=logp[win_i], rejected=logp[lose_j], ref_chosen=ref[win_i], ref_rejected=ref[lose_j],
                             prev_chosen=prev[win_i], prev_rejected=prev[lose_j])
        return jnp.sum(weight * losses.get("inpo")(lp, eta=eta, tau=tau).losses)

    # The loss is quadratic in the logits (log-prob differences are logit differences): Newton's
    # step solves it; the pseudo-inverse skips the logits' shift direction, which no loss sees.
    theta = np.zeros(n)
    for _ in range(2):
        g = np.asarray(jax.grad(expected_loss)(jnp.asarray(theta, jnp.float32)), np.float64)
        hess = np.asarray(jax.hessian(expected_loss)(jnp.asarray(theta, jnp.float32)), np.float64)
        theta = theta - np.linalg.pinv(hess, rcond=1e-6) @ g
    theta = jnp.asarray(theta, jnp.float32)
    got = np.asarray(jax.nn.softmax(theta), np.float64)
    log_omd = (1 - eta * tau) * np.log(pi_t) + eta * tau * np.log(pi_ref) + eta * pref @ pi_t
    want = np.exp(log_omd - log_omd.max())
    np.testing.assert_allclose(got, want / want.sum(), atol=1e-5)
    assert np.abs(np.asarray(jax.grad(expected_loss)(theta))).max() < 1e-4
    # Not a coincidence of this game: the plain previous iterate is not the minimiser.
    assert np.abs(np.asarray(jax.grad(expected_loss)(prev))).max() > 1e-2


# ------------------------------------------------------------------------------- limits


def test_xpo_with_alpha_zero_and_hypo_with_lam_zero_are_dpo():
    lp = _pairs(6)
    dpo = losses.get("dpo")(lp, beta=0.3)
    for name, hp in (("xpo", {"alpha": 0.0}), ("hypo", {"lam": 0.0})):
        out = losses.get(name)(lp, beta=0.3, **hp)
        np.testing.assert_allclose(out.losses, dpo.losses, rtol=1e-6)
        for key, value in dpo.metrics.items():
            np.testing.assert_allclose(out.metrics[key], value, rtol=1e-6)
    g_dpo = _grad_of_mean("dpo", lp, ("chosen", "rejected"), beta=0.3)
    g_xpo = _grad_of_mean("xpo", lp, ("chosen", "rejected"), beta=0.3, alpha=0.0)
    np.testing.assert_allclose(g_xpo["chosen"], g_dpo["chosen"], rtol=1e-6)


def test_inpo_with_eta_tau_one_reads_only_the_reference_and_is_ipo():
    eta = 4.0
    lp = _pairs(7)
    a = losses.get("inpo")(lp, eta=eta, tau=1.0 / eta).losses
    b = losses.get("inpo")(dataclasses.replace(lp, prev_chosen=lp.prev_chosen - 30.0, prev_rejected=lp.prev_rejected + 9.0),
                           eta=eta, tau=1.0 / eta).losses
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, losses.get("ipo")(lp, beta=1.0 / eta).losses, rtol=1e-5)
    g = jax.grad(lambda prev: jnp.sum(losses.get("inpo")(dataclasses.replace(lp, prev_chosen=prev),
                                                        eta=eta, tau=1.0 / eta).losses))(lp.prev_chosen)
    assert not np.any(np.asarray(g))


def test_inpo_with_tau_zero_reads_only_the_previous_iterate():
    lp = _pairs(8)
    a = losses.get("inpo")(lp, eta=3.0, tau=0.0).losses
    b = losses.get("inpo")(dataclasses.replace(lp, ref_chosen=lp.ref_chosen + 11.0), eta=3.0, tau=0.0).losses
    np.testing.assert_array_equal(a, b)
    # ...and the target is IPO's against pi_t.
    as_ref = dataclasses.replace(lp, ref_chosen=lp.prev_chosen, ref_rejected=lp.prev_rejected)
    np.testing.assert_allclose(a, losses.get("ipo")(as_ref, beta=1 / 3.0).losses, rtol=1e-5)


def test_sppo_with_hard_win_rates_is_sppo_hard():
    lp = _pairs(9, score_chosen=np.ones(B), score_rejected=np.zeros(B))
    np.testing.assert_allclose(losses.get("sppo")(lp, eta=20.0).losses,
                               losses.get("sppo_hard")(lp, beta=1 / 20.0).losses, rtol=1e-5)


def test_sppo_minimiser_is_rho_equal_eta_times_win_rate_advantage():
    eta = 50.0
    lp = _pairs(10)
    at_target = dataclasses.replace(lp, chosen=lp.ref_chosen + eta * (lp.score_chosen - 0.5),
                                    rejected=lp.ref_rejected + eta * (lp.score_rejected - 0.5))
    out = losses.get("sppo")(at_target, eta=eta)
    np.testing.assert_allclose(out.losses, 0.0, atol=1e-6)
    g = _grad_of_mean("sppo", at_target, ("chosen", "rejected"), eta=eta)
    np.testing.assert_allclose(g["chosen"], 0.0, atol=1e-5)
    # The implied win-rate advantage is what the metrics report.
    np.testing.assert_allclose(out.metrics["rewards/chosen"], lp.score_chosen - 0.5, atol=1e-5)
    # Off the target the loss is positive.
    assert np.all(np.asarray(losses.get("sppo")(lp, eta=eta).losses) > 0)


# ------------------------------------------------------------------------------- signs


def test_nash_md_raises_winning_samples_and_lowers_losing_ones_at_the_reference():
    up = _unpaired(11, score=np.array([0.9, 0.6, 0.51, 0.49, 0.2, 0.0]))
    up = dataclasses.replace(up, logps=up.ref_logps)
    g = np.asarray(_grad_of_mean("nash_md", up, ("logps",), beta=0.1)["logps"])
    assert np.all(g[:3] < 0) and np.all(g[3:] > 0), g  # descent raises logp where p > 1/2
    # Far above the reference the KL term wins even for a winner.
    above = dataclasses.replace(up, logps=up.ref_logps + 20.0, score=jnp.full(B, 0.9))
    assert np.all(np.asarray(_grad_of_mean("nash_md", above, ("logps",), beta=0.1)["logps"]) > 0)


def test_xpo_exploration_lowers_the_reference_samples_log_prob():
    lp = _pairs(12)
    with_bonus = _grad_of_mean("xpo", lp, ("chosen", "rejected"), beta=0.1, alpha=0.5)
    without = _grad_of_mean("xpo", lp, ("chosen", "rejected"), beta=0.1, alpha=0.0)
    for field, from_ref in (("chosen", lp.chosen_from_reference), ("rejected", lp.rejected_from_reference)):
        extra = np.asarray(with_bonus[field] - without[field])
        from_ref = np.asarray(from_ref) > 0
        assert np.all(extra[from_ref] > 0) and np.all(extra[~from_ref] == 0), (field, extra)


def test_hypo_pulls_the_sample_back_towards_the_reference():
    lp = _pairs(13, sample=np.full(B, -10.0), ref_sample=np.array([-20, -15, -11, -9, -5, -1.0]))
    g = np.asarray(_grad_of_mean("hypo", lp, ("sample",), lam=0.1)["sample"])
    assert np.all(g[:3] > 0) and np.all(g[3:] < 0), g  # above the reference: pushed down, below: up


# ------------------------------------------------------------------------- stability


@pytest.mark.parametrize("name", ["sppo", "inpo", "xpo", "nash_md", "hypo"])
def test_finite_values_and_gradients_at_extreme_log_probs(name):
    spec = losses.get(name)
    if spec.inputs is types.UnpairedLogps:
        inputs = _unpaired(14, logps=np.array([-1e4, -1e4, -1e-3, -1e4, -5e3, -1e-3]),
                           ref_logps=np.array([-1e-3, -1e4, -1e4, -5e3, -1e4, -1e-3]))
        fields = ("logps",)
    else:
        extreme = np.array([-1e4, -1e-3, -1e4, -5e3, -1e-3, -1e4])
        inputs = _pairs(14, chosen=extreme, rejected=extreme[::-1], ref_chosen=extreme[::-1], ref_rejected=extreme,
                        prev_chosen=np.roll(extreme, 1), prev_rejected=np.roll(extreme, 2), sample=extreme,
                        ref_sample=np.roll(extreme, 3))
        fields = ("chosen", "rejected", "sample")
    out = spec(inputs, **spec.hparam_defaults)
    assert np.all(np.isfinite(np.asarray(out.losses))), out.losses
    for key, value in out.metrics.items():
        assert np.all(np.isfinite(np.asarray(value))), key
    for field, g in _grad_of_mean(name, inputs, fields).items():
        assert np.all(np.isfinite(np.asarray(g))), (field, g)


def test_xpo_ignores_a_policy_response_at_minus_infinity():
    # 0 * -inf would be NaN: a response the reference did not draw must contribute exactly nothing.
    # (DPO's own term is not finite there, so the exploration term is read from its metric.)
    lp = _pairs(15, rejected=np.full(B, -np.inf), rejected_from_reference=np.zeros(B))
    explore = np.asarray(losses.get("xpo")(lp, alpha=1.0).metrics["xpo/exploration"])
    np.testing.assert_allclose(explore, np.asarray(lp.chosen) * np.asarray(lp.chosen_from_reference), rtol=1e-6)


# ------------------------------------------------------------------- declared needs, errors


def test_registry_declares_what_each_online_loss_reads():
    assert losses.get("inpo").needs == {"reference logps", "previous-iterate logps"}
    assert losses.get("xpo").needs == {"reference logps", "response origins"}
    assert losses.get("hypo").needs == {"reference logps", "a policy sample"}
    assert losses.get("nash_md").needs == {"reference logps", "scores"}
    assert losses.get("sppo").needs == {"reference logps", "scores"}


@pytest.mark.parametrize("name, hparams, message", [
    ("inpo", {"tau": -1.0},
     "tau=-1.0: loss 'inpo' needs tau >= 0 (tau is the KL(pi || pi_ref) regularisation of the preference game; "
     "a negative value would reward moving away from the reference); set a non-negative value"),
    ("sppo", {"eta": 0.0},
     "eta=0.0: loss 'sppo' needs eta > 0 (eta scales the target log-ratio eta*(P - 1/2): 0 makes the target 0 "
     "whatever the preference, and a negative value pushes winners down); set a positive value"),
    ("xpo", {"alpha": -1e-5},
     "alpha=-1e-05: loss 'xpo' needs alpha >= 0 (alpha weighs the optimism bonus that lowers the likelihood of "
     "the reference's samples; a negative value would pull the policy back to them); set a non-negative value"),
])
def test_out_of_domain_hyperparameters_are_refused_with_the_reason(name, hparams, message):
    inputs = _pairs(0)
    with pytest.raises(registry.LossHparamError) as err:
        losses.get(name)(inputs, **hparams)
    assert str(err.value) == message


def test_a_missing_online_field_is_named():
    lp = _pairs(0)
    with pytest.raises(losses.LossInputError, match="loss 'inpo' needs field 'prev_chosen' of PairLogps, but it is None"):
        losses.get("inpo")(dataclasses.replace(lp, prev_chosen=None))
    with pytest.raises(losses.LossInputError, match="loss 'hypo' needs field 'sample'"):
        losses.get("hypo")(dataclasses.replace(lp, sample=None))


# --------------------------------------------------------------- Batch -> loss inputs


def _online_batch(k: int, b: int = 4):
    """A numpy Batch of k responses per prompt with sampler log-probs and origins; example 3 is filler."""
    batch = synthetic_batches.random_batch(b, k, 12, 50, seed=0)
    sampler = np.arange(b * k, dtype=np.float32).reshape(b, k) * -1.0 - 1.0
    origin = np.tile(np.array([ORIGIN_POLICY, ORIGIN_REFERENCE, ORIGIN_POLICY][:k], np.float32), (b, 1))
    origin[1, :2] = [ORIGIN_REFERENCE, ORIGIN_POLICY]
    origin[2, :2] = ORIGIN_DATA
    weight = np.ones(b, np.float32)
    weight[3] = 0.0
    sampler[3] = np.nan
    origin[3] = np.nan
    return batch.replace(sampler_logps=sampler, origin=origin, weight=weight)


def _scores(b: int, k: int) -> Scores:
    logps = -np.arange(1, b * k + 1, dtype=np.float32).reshape(b, k) * 2.0
    return Scores(logps=jnp.asarray(logps), lengths=jnp.full((b, k), 3.0), ref_logps=jnp.asarray(logps - 0.5))


def test_columns_detect_the_online_columns_among_real_examples():
    batch = _online_batch(3)
    assert loss_inputs.Columns.present_in(batch) == loss_inputs.Columns(
        scores=True, margin=True, sampler_logps=True, origin=True)
    plain = batch.replace(sampler_logps=None, origin=None)
    cols = loss_inputs.Columns.present_in(plain)
    assert not cols.sampler_logps and not cols.origin
    # NaN on every real example: the column is absent.
    unknown = batch.replace(sampler_logps=np.full((4, 3), np.nan, np.float32))
    assert not loss_inputs.Columns.present_in(unknown).sampler_logps


def test_build_fills_the_online_pair_fields_from_a_k3_batch():
    batch, r = _online_batch(3), _scores(4, 3)
    lp = loss_inputs.build(types.PairLogps, r, batch, loss_inputs.Columns.present_in(batch))
    np.testing.assert_array_equal(lp.prev_chosen, [-1.0, -4.0, -7.0, 0.0])  # filler's NaN -> 0
    np.testing.assert_array_equal(lp.prev_rejected, [-2.0, -5.0, -8.0, 0.0])
    np.testing.assert_array_equal(lp.chosen_from_reference, [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(lp.rejected_from_reference, [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(lp.sample, np.asarray(r.logps)[:, 2])
    np.testing.assert_array_equal(lp.ref_sample, np.asarray(r.ref_logps)[:, 2])
    np.testing.assert_array_equal(lp.chosen, np.asarray(r.logps)[:, 0])
    for name in ("inpo", "xpo", "hypo", "dpo"):
        out = losses.get(name)(lp)
        assert out.losses.shape == (4,) and np.all(np.isfinite(np.asarray(out.losses))), name


def test_build_without_online_columns_or_third_response_leaves_the_fields_empty():
    batch, r = _online_batch(2), _scores(4, 2)
    lp = loss_inputs.build(types.PairLogps, r, batch, loss_inputs.Columns(scores=True))
    assert lp.prev_chosen is None and lp.chosen_from_reference is None and lp.sample is None
    lp = loss_inputs.build(types.PairLogps, r, batch, loss_inputs.Columns.present_in(batch))
    assert lp.prev_chosen is not None and lp.sample is None
    with pytest.raises(losses.LossInputError, match="loss 'hypo' needs field 'sample'"):
        losses.get("hypo")(lp)


def test_build_gives_nash_md_its_win_probability_from_the_scores_column():
    batch = synthetic_batches.random_batch(4, 1, 12, 50, seed=1, kind="unpaired")
    batch = batch.replace(scores=np.array([[0.9], [0.1], [0.5], [np.nan]], np.float32))
    r = _scores(4, 1)
    up = loss_inputs.build(types.UnpairedLogps, r, batch, loss_inputs.Columns.present_in(batch))
    np.testing.assert_allclose(up.score, [0.9, 0.1, 0.5, 0.0])
    out = losses.get("nash_md")(up)
    np.testing.assert_allclose(out.metrics["nash_md/win_prob"], [0.9, 0.1, 0.5, 0.0])
    assert loss_inputs.build(types.UnpairedLogps, r, batch, loss_inputs.Columns()).score is None
