"""Reference-free pairwise losses against their papers' equations, in numpy.

Each `ref_*` function is written from the paper's equation (cited in its
docstring) in float64 numpy, independently of prefjax: probabilities and odds
are formed literally (P = exp(mean log-prob), odds = P / (1 - P)) rather than
in log space, which float64 affords at the synthetic inputs' log-prob ranges. The
tests then check each loss's own properties: limits, reductions to other
losses, the identities between ORPO and ASFT, and gradient signs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefjax import losses
from prefjax.data import synthetic_logps as synthetic
from tests.losses.numpy_ref import as64, log_sigmoid

BATCHES = (1, 7, 64)
DTYPES = (jnp.float32, jnp.bfloat16)
NAMES = ("simpo", "orpo", "cpo", "cpo_simpo", "triple_po", "asft", "slic")


def _means(lp):
    """Length-averaged log-probs l(y)/|y| of chosen and rejected, float64."""
    return as64(lp.chosen) / as64(lp.chosen_len), as64(lp.rejected) / as64(lp.rejected_len)


def _log_odds(mean_logp):
    """log(P / (1 - P)) with P = exp(mean log-prob), formed literally in float64."""
    p = np.exp(mean_logp)
    return np.log(p / (1.0 - p))


def _smoothed(z, e):
    """-(1-e) log sigma(z) - e log sigma(-z)."""
    return -(1 - e) * log_sigmoid(z) - e * log_sigmoid(-z)


def ref_simpo(lp, beta=2.0, gamma=1.0, label_smoothing=0.0):
    """SimPO eq. 6: -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma), plus smoothing."""
    mw, ml = _means(lp)
    return _smoothed(beta * mw - beta * ml - gamma, label_smoothing)


def ref_orpo(lp, beta=0.1):
    """ORPO eqs. 6-7: L_SFT + lambda L_OR, L_OR = -log sigma(log(odds(y_w) / odds(y_l))), token-mean SFT."""
    mw, ml = _means(lp)
    p_w, p_l = np.exp(mw), np.exp(ml)
    odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
    return -mw - beta * log_sigmoid(np.log(odds_ratio))


def ref_cpo(lp, beta=0.1, alpha=1.0, label_smoothing=0.0):
    """CPO eq. 3: -log sigma(beta log pi(y_w) - beta log pi(y_l)) + alpha * NLL(y_w), NLL per token."""
    c, r = as64(lp.chosen), as64(lp.rejected)
    return _smoothed(beta * c - beta * r, label_smoothing) + alpha * (-c / as64(lp.chosen_len))


def ref_cpo_simpo(lp, beta=10.0, gamma=5.4, alpha=0.05, label_smoothing=0.0):
    """CPO-SimPO (CPO_SIMPO README): SimPO's objective plus alpha * token-mean NLL(y_w)."""
    mw, _ = _means(lp)
    return ref_simpo(lp, beta, gamma, label_smoothing) + alpha * (-mw)


def ref_triple_po(lp, beta=0.01, alpha=1.0):
    """TPO: -log sigma(beta log pi(y_w) - beta log pi(y_l)) - alpha * log pi(y_gold) / |y_gold|."""
    c, r = as64(lp.chosen), as64(lp.rejected)
    return -log_sigmoid(beta * c - beta * r) + alpha * (-as64(lp.gold) / as64(lp.gold_len))


def ref_asft(lp, lambda_coef=0.1):
    """ASFT: -log P(y_w)/|y_w| - lambda [log sigma(r_odds(y_w)) + log sigma(-r_odds(y_l))], P per token."""
    mw, ml = _means(lp)
    return -mw - lambda_coef * (log_sigmoid(_log_odds(mw)) + log_sigmoid(-_log_odds(ml)))


def ref_slic(lp, delta=1.0, lambda_coef=0.1):
    """SLiC-HF eq. 1: max(0, delta - log P(y+|x) + log P(y-|x)) - lambda log P(y_ref|x), y_ref = y+."""
    c, r = as64(lp.chosen), as64(lp.rejected)
    return np.maximum(0.0, delta - c + r) - lambda_coef * c


CASES = [
    ("simpo", ref_simpo, {}),
    ("simpo", ref_simpo, {"beta": 2.5, "gamma": 0.3, "label_smoothing": 0.1}),
    ("orpo", ref_orpo, {}),
    ("orpo", ref_orpo, {"beta": 1.0}),
    ("cpo", ref_cpo, {}),
    ("cpo", ref_cpo, {"beta": 0.05, "alpha": 0.3, "label_smoothing": 0.2}),
    ("cpo_simpo", ref_cpo_simpo, {}),
    ("cpo_simpo", ref_cpo_simpo, {"beta": 2.0, "gamma": 1.0, "alpha": 1.0}),
    ("triple_po", ref_triple_po, {}),
    ("triple_po", ref_triple_po, {"beta": 0.1, "alpha": 0.5}),
    ("asft", ref_asft, {}),
    ("asft", ref_asft, {"lambda_coef": 0.5}),
    ("slic", ref_slic, {}),
    ("slic", ref_slic, {"delta": 5.0, "lambda_coef": 0.5}),
]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("name,ref,hparams", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_paper_equation(name, ref, hparams, batch, dtype):
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=batch, seed=batch, dtype=dtype)
    out = spec(lp, **hparams)
    assert out.losses.dtype == jnp.float32
    assert out.losses.shape == (batch,)
    np.testing.assert_allclose(np.asarray(out.losses), ref(lp, **hparams), rtol=3e-5, atol=3e-5)


def _with_lengths(spec, lp):
    """Factory inputs with chosen/rejected lengths filled in (CPO and Triple-PO don't all declare them)."""
    n = lp.chosen.shape[0]
    lengths = np.random.default_rng(11).integers(1, 30, (2, n)).astype(np.float32)
    return dataclasses.replace(lp, chosen_len=jnp.asarray(lengths[0]), rejected_len=jnp.asarray(lengths[1]))


@pytest.mark.parametrize("name", NAMES)
def test_reward_metrics_and_their_detachment(name):
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=6, seed=2)
    out = spec(lp)
    hp = spec.hparam_defaults
    c, r = as64(lp.chosen), as64(lp.rejected)
    if name in ("simpo", "orpo", "cpo_simpo"):
        mw, ml = _means(lp)
        want_w, want_l = hp["beta"] * mw, hp["beta"] * ml
    elif name == "asft":
        want_w, want_l = _log_odds(_means(lp)[0]), _log_odds(_means(lp)[1])
    elif name == "slic":
        want_w, want_l = c, r
    else:  # cpo, triple_po: beta times the summed log-probs
        want_w, want_l = hp["beta"] * c, hp["beta"] * r
    np.testing.assert_allclose(out.metrics["rewards/chosen"], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.metrics["rewards/rejected"], want_l, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.metrics["rewards/accuracies"], (want_w > want_l).astype(np.float32))
    np.testing.assert_allclose(out.metrics["logps/chosen"], c, rtol=1e-6)

    # Metrics carry no gradient.
    def metric_sum(chosen):
        m = spec(dataclasses.replace(lp, chosen=chosen)).metrics
        return sum(jnp.sum(v) for v in m.values())

    np.testing.assert_array_equal(jax.grad(metric_sum)(lp.chosen), 0.0)


# --- SimPO -------------------------------------------------------------------------------------------

logp = st.floats(min_value=-1e4, max_value=-1e-3, allow_nan=False, allow_infinity=False)
length = st.integers(min_value=1, max_value=4096)
positive = st.floats(min_value=1e-2, max_value=10.0)


def _pair(cw, cl, lw=1.0, ll=1.0, **columns):
    one = lambda v: jnp.asarray([v], jnp.float32)  # noqa: E731
    extra = {k: one(v) for k, v in columns.items()}
    return losses.PairLogps(chosen=one(cw), rejected=one(cl), chosen_len=one(lw), rejected_len=one(ll),
                            **extra)


@settings(max_examples=60, deadline=None)
@given(logp, logp, length, length, positive)
def test_simpo_without_margin_or_smoothing_is_bt_on_mean_logps(cw, cl, lw, ll, beta):
    out = losses.get("simpo")(_pair(cw, cl, lw, ll), beta=beta, gamma=0.0, label_smoothing=0.0)
    mw, ml = np.float32(cw) / lw, np.float32(cl) / ll
    np.testing.assert_allclose(out.losses, -log_sigmoid(beta * (mw - ml)), rtol=1e-4, atol=1e-5)


def test_simpo_margin_gamma_shifts_the_logit_and_is_log2_at_the_margin():
    """At beta (m_w - m_l) = gamma the pair sits on the margin: loss log 2."""
    beta, gamma = 2.0, 1.0
    lp = _pair(-10.0, -30.0, lw=20.0, ll=30.0)  # m_w - m_l = -0.5 + 1 = 0.5 = gamma / beta
    np.testing.assert_allclose(losses.get("simpo")(lp, beta=beta, gamma=gamma).losses, np.log(2.0), rtol=1e-6)


def test_simpo_is_invariant_to_length_at_fixed_mean_logp():
    short, long = _pair(-2.0, -6.0, 2.0, 3.0), _pair(-200.0, -600.0, 200.0, 300.0)
    spec = losses.get("simpo")
    np.testing.assert_allclose(spec(short).losses, spec(long).losses, rtol=1e-6)


# --- ORPO and ASFT ---------------------------------------------------------------------------------

NEAR_ONE_AND_TINY = np.array([0.0, -1e-8, -1e-6, -1e-3, -1.0, -1e2, -1e4], np.float32)


@pytest.mark.parametrize("name", ["orpo", "asft"])
def test_odds_losses_are_finite_when_probability_is_near_one_or_tiny(name):
    """mean log-prob 0 (P = 1, infinite odds) or -1e4 (P underflows to 0): loss and gradients stay finite."""
    cw, cl = np.meshgrid(NEAR_ONE_AND_TINY, NEAR_ONE_AND_TINY)
    lp = losses.PairLogps(chosen=jnp.asarray(cw.ravel()), rejected=jnp.asarray(cl.ravel()),
                          chosen_len=jnp.ones(cw.size), rejected_len=jnp.ones(cw.size))
    spec = losses.get(name)
    out = spec(lp)
    assert bool(jnp.all(jnp.isfinite(out.losses))), out.losses
    for value in out.metrics.values():
        assert bool(jnp.all(jnp.isfinite(value)))
    grads = jax.grad(lambda c, r: jnp.sum(spec(dataclasses.replace(lp, chosen=c, rejected=r)).losses),
                     argnums=(0, 1))(lp.chosen, lp.rejected)
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g))), g


def _unit_length_pairs(chosen, rejected):
    """[B] pairs of one-token responses, so mean log-prob = log-prob."""
    return losses.PairLogps(chosen=chosen, rejected=rejected,
                            chosen_len=jnp.ones_like(chosen), rejected_len=jnp.ones_like(chosen))


def test_orpo_odds_ratio_term_decreases_as_chosen_rises():
    """d/d l(y_w) of -log sigma(log OR) < 0 everywhere, also near P(y_w) = 1 and P(y_w) ~ 0."""
    grid = jnp.asarray(np.concatenate([-np.logspace(-5, 4, 200), [-1e-6]]), jnp.float32)
    spec = losses.get("orpo")

    def odds_term(c):
        out = spec(_unit_length_pairs(c, jnp.full_like(c, -3.0)), beta=1.0)
        return out.losses - out.metrics["nll_loss"]

    g = jax.grad(lambda c: jnp.sum(odds_term(c)))(grid)
    assert bool(jnp.all(g < 0)), g
    order = np.argsort(np.asarray(grid))
    assert np.all(np.diff(np.asarray(odds_term(grid))[order]) <= 0)


def test_orpo_metrics_follow_trl():
    spec = losses.get("orpo")
    lp = synthetic.make_inputs(spec, batch=8, seed=4)
    out = spec(lp)
    mw, ml = _means(lp)
    log_or = _log_odds(mw) - _log_odds(ml)
    np.testing.assert_allclose(out.metrics["log_odds_chosen"], log_or, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.metrics["log_odds_ratio"], log_sigmoid(log_or), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.metrics["nll_loss"], -mw, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=-50.0, max_value=-1e-2), st.floats(min_value=-50.0, max_value=-1e-2),
       st.floats(min_value=0.0, max_value=5.0))
def test_asft_closed_form(mw, ml, lam):
    """log sigma(log odds) = log P, so L_ASFT = -(1+lambda) m_w - lambda log(1 - exp(m_l))."""
    out = losses.get("asft")(_pair(mw, ml), lambda_coef=lam)
    mw, ml = float(np.float32(mw)), float(np.float32(ml))
    want = -(1 + lam) * mw - lam * np.log1p(-np.exp(ml))
    np.testing.assert_allclose(out.losses, want, rtol=1e-4, atol=1e-4)


def test_orpo_is_upper_bounded_by_asft_at_equal_lambda():
    """sigma(a) sigma(-b) <= sigma(a - b), hence L_ORPO <= L_ASFT for the same lambda."""
    spec = losses.get("asft")
    lp = synthetic.make_inputs(spec, batch=64, seed=9)
    lp = dataclasses.replace(lp, chosen=lp.chosen * 0.05, rejected=lp.rejected * 0.05)
    for lam in (0.1, 1.0, 3.0):
        orpo = losses.get("orpo")(lp, beta=lam).losses
        asft = spec(lp, lambda_coef=lam).losses
        assert bool(jnp.all(orpo <= asft + 1e-5))


def test_odds_losses_at_zero_weight_are_the_token_mean_nll():
    lp = synthetic.make_inputs(losses.get("orpo"), batch=8, seed=6)
    nll = -as64(lp.chosen) / as64(lp.chosen_len)
    np.testing.assert_allclose(losses.get("orpo")(lp, beta=0.0).losses, nll, rtol=1e-6)
    np.testing.assert_allclose(losses.get("asft")(lp, lambda_coef=0.0).losses, nll, rtol=1e-6)


# --- CPO, CPO-SimPO, Triple-PO -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(logp, logp, st.floats(min_value=1e-3, max_value=10.0))
def test_cpo_without_nll_is_dpo_with_a_zero_reference(cw, cl, beta):
    lp = _pair(cw, cl, ref_chosen=0.0, ref_rejected=0.0)
    np.testing.assert_allclose(losses.get("cpo")(lp, beta=beta, alpha=0.0).losses,
                               losses.get("dpo")(lp, beta=beta).losses, rtol=1e-6, atol=1e-7)


def test_cpo_nll_term_is_alpha_times_token_mean_nll():
    spec = losses.get("cpo")
    lp = synthetic.make_inputs(spec, batch=16, seed=7)
    extra = spec(lp, alpha=0.7).losses - spec(lp, alpha=0.0).losses
    np.testing.assert_allclose(extra, 0.7 * (-as64(lp.chosen) / as64(lp.chosen_len)), rtol=1e-5, atol=1e-5)


def test_cpo_simpo_without_nll_is_simpo():
    spec = losses.get("cpo_simpo")
    lp = synthetic.make_inputs(spec, batch=16, seed=8)
    for beta, gamma in ((2.0, 1.0), (10.0, 5.4)):
        np.testing.assert_allclose(spec(lp, beta=beta, gamma=gamma, alpha=0.0).losses,
                                   losses.get("simpo")(lp, beta=beta, gamma=gamma).losses, rtol=1e-6)


def test_triple_po_preference_term_is_cpo_and_gold_enters_only_through_its_nll():
    spec = losses.get("triple_po")
    lp = _with_lengths(spec, synthetic.make_inputs(spec, batch=16, seed=10))
    np.testing.assert_allclose(spec(lp, beta=0.05, alpha=0.0).losses,
                               losses.get("cpo")(lp, beta=0.05, alpha=0.0).losses, rtol=1e-6)
    grad_gold = jax.grad(lambda g: jnp.sum(spec(dataclasses.replace(lp, gold=g), alpha=0.5).losses))(lp.gold)
    np.testing.assert_allclose(grad_gold, -0.5 / as64(lp.gold_len), rtol=1e-6)


def test_triple_po_requires_the_gold_response():
    spec = losses.get("triple_po")
    lp = synthetic.make_inputs(spec, batch=2)
    with pytest.raises(losses.LossInputError, match="needs field 'gold'"):
        spec(dataclasses.replace(lp, gold=None))


# --- SLiC-HF ------------------------------------------------------------------------------------------


def test_slic_calibration_is_zero_past_the_margin_and_linear_before_it():
    delta, lam = 1.0, 0.1
    # margins l(y_w) - l(y_l): 3 (past delta), 1 (at delta), 0.5 and -4 (inside).
    lp = losses.PairLogps(chosen=jnp.asarray([-10.0, -10.0, -10.0, -10.0]),
                          rejected=jnp.asarray([-13.0, -11.0, -10.5, -6.0]))
    out = losses.get("slic")(lp, delta=delta, lambda_coef=lam)
    np.testing.assert_allclose(out.metrics["slic/calibration_loss"], [0.0, 0.0, 0.5, 5.0], atol=1e-6)
    np.testing.assert_allclose(out.losses, np.array([0.0, 0.0, 0.5, 5.0]) + lam * 10.0, rtol=1e-6)
    slic = losses.get("slic")
    grad_rejected = jax.grad(lambda r: jnp.sum(slic(dataclasses.replace(lp, rejected=r)).losses))(lp.rejected)
    np.testing.assert_allclose(grad_rejected, [0.0, 0.0, 1.0, 1.0])


# --- Gradient signs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [1.0, 0.01, 100.0], ids=["plain", "near-zero", "large"])
def test_gradient_signs(name, scale):
    """Raising l(y_w) never raises the loss; raising l(y_l) never lowers it (no label smoothing)."""
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=32, seed=12)
    lp = dataclasses.replace(lp, chosen=lp.chosen * scale, rejected=lp.rejected * scale)

    def total(c, r):
        return jnp.sum(spec(dataclasses.replace(lp, chosen=c, rejected=r)).losses)

    g_chosen, g_rejected = jax.grad(total, argnums=(0, 1))(lp.chosen, lp.rejected)
    assert bool(jnp.all(jnp.isfinite(g_chosen))) and bool(jnp.all(jnp.isfinite(g_rejected)))
    assert bool(jnp.all(g_chosen <= 0.0)), g_chosen
    assert bool(jnp.all(g_rejected >= 0.0)), g_rejected


@pytest.mark.parametrize("name", NAMES)
def test_jit_with_traced_hyperparameters(name):
    """Hyperparameters may be traced (e.g. swept under vmap): no Python branching on their values."""
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=5, seed=13)
    hp = {k: v for k, v in spec.hparam_defaults.items()}
    jitted = jax.jit(lambda h: spec.fn(lp, **h).losses)(jax.tree.map(jnp.float32, hp))
    np.testing.assert_allclose(jitted, spec(lp).losses, rtol=1e-5, atol=1e-6)
