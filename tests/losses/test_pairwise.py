"""Pairwise-with-reference losses against their papers' equations, in numpy.

Each `ref_*` function below is written from the paper's equation (cited in its
docstring) in float64 numpy, independently of prefjax; the test compares the
registered loss with it on random inputs of several batch sizes and dtypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.data import synthetic_logps as synthetic
from tests.losses.numpy_ref import as64, log_sigmoid, sigmoid

BATCHES = (1, 7, 64)
DTYPES = (jnp.float32, jnp.bfloat16)


def _h(lp):
    """DPO margin h = [l(y_w) - l_ref(y_w)] - [l(y_l) - l_ref(y_l)] in float64."""
    rw = as64(lp.chosen) - as64(lp.ref_chosen)
    rl = as64(lp.rejected) - as64(lp.ref_rejected)
    return rw, rl, rw - rl


def ref_dpo(lp, beta=0.1, label_smoothing=0.0):
    """DPO eq. 7: -log sigma(beta h); cDPO: (1-e)(-log s(bh)) + e(-log s(-bh))."""
    _, _, h = _h(lp)
    e = label_smoothing
    return -(1 - e) * log_sigmoid(beta * h) - e * log_sigmoid(-beta * h)


def ref_robust_dpo(lp, beta=0.1, label_smoothing=0.1):
    """Chowdhury et al. eq. 8: [(1-e) l(bh) - e l(-bh)] / (1-2e), l(z) = -log sigma(z)."""
    _, _, h = _h(lp)
    e = label_smoothing
    return ((1 - e) * -log_sigmoid(beta * h) - e * -log_sigmoid(-beta * h)) / (1 - 2 * e)


def ref_ipo(lp, beta=0.1):
    """Azar et al. eq. 17 (empirical IPO): (h - tau^-1/2)^2 with tau = beta."""
    _, _, h = _h(lp)
    return (h - 1 / (2 * beta)) ** 2


def ref_hinge(lp, beta=0.1):
    """RSO hinge-norm: max(0, 1 - beta h)."""
    _, _, h = _h(lp)
    return np.maximum(0.0, 1 - beta * h)


def ref_exo(lp, beta=0.1, label_smoothing=1e-3):
    """EXO pairwise: sum_y p_theta(y) log(p_theta(y) / p_label(y)), p_theta = softmax(beta rho)."""
    rw, rl, _ = _h(lp)
    z = np.stack([beta * rw, beta * rl], -1)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    q = np.array([1 - label_smoothing, label_smoothing])
    return (p * (np.log(p) - np.log(q))).sum(-1)


def ref_nca(lp, beta=0.1):
    """NCA (Chen et al. 2024), K=2 preference case: -log s(r_w) - 1/2 sum_y log s(-r_y)."""
    rw, rl, _ = _h(lp)
    return -log_sigmoid(beta * rw) - 0.5 * (log_sigmoid(-beta * rw) + log_sigmoid(-beta * rl))


def ref_sppo_hard(lp, beta=0.1):
    """SPPO eq. 4.8, P(y_w > pi) = 1, P(y_l > pi) = 0, eta = 1/beta."""
    rw, rl, _ = _h(lp)
    eta = 1 / beta
    return (rw - eta * (1 - 0.5)) ** 2 + (rl - eta * (0 - 0.5)) ** 2


def ref_apo_zero(lp, beta=0.1):
    """APO-zero: sigma(-beta rho_w) + sigma(beta rho_l)."""
    rw, rl, _ = _h(lp)
    return (1 - sigmoid(beta * rw)) + sigmoid(beta * rl)


def ref_apo_down(lp, beta=0.1):
    """APO-down: sigma(beta rho_w) + 1 - sigma(beta (rho_w - rho_l))."""
    rw, rl, _ = _h(lp)
    return sigmoid(beta * rw) + 1 - sigmoid(beta * (rw - rl))


def ref_dpo_positive(lp, beta=0.1, dpop_lambda=50.0):
    """Smaug eq. 3: -log s(beta (h - lambda max(0, log pi_ref(y_w)/pi_theta(y_w))))."""
    rw, _, h = _h(lp)
    return -log_sigmoid(beta * (h - dpop_lambda * np.maximum(0.0, -rw)))


def ref_ln_dpo(lp, beta=0.1):
    """LN-DPO: -log sigma(beta (rho_w/|y_w| - rho_l/|y_l|))."""
    rw, rl, _ = _h(lp)
    return -log_sigmoid(beta * (rw / as64(lp.chosen_len) - rl / as64(lp.rejected_len)))


def ref_length_regularized_dpo(lp, beta=0.1, alpha=0.01):
    """R-DPO eq. 9: -log sigma(beta h + (alpha |y_w| - alpha |y_l|))."""
    _, _, h = _h(lp)
    return -log_sigmoid(beta * h + alpha * as64(lp.chosen_len) - alpha * as64(lp.rejected_len))


def ref_rpo(lp, beta=0.1, alpha=1.0):
    """RPO: DPO + alpha * token-mean NLL of y_w."""
    _, _, h = _h(lp)
    return -log_sigmoid(beta * h) + alpha * (-as64(lp.chosen) / as64(lp.chosen_len))


CASES = [
    ("dpo", ref_dpo, {}),
    ("dpo", ref_dpo, {"beta": 0.5, "label_smoothing": 0.2}),
    ("robust_dpo", ref_robust_dpo, {}),
    ("robust_dpo", ref_robust_dpo, {"beta": 0.3, "label_smoothing": 0.4}),
    ("ipo", ref_ipo, {}),
    ("ipo", ref_ipo, {"beta": 1.0}),
    ("hinge", ref_hinge, {"beta": 0.05}),
    ("exo", ref_exo, {}),
    ("exo", ref_exo, {"beta": 0.5, "label_smoothing": 0.1}),
    ("nca", ref_nca, {}),
    ("sppo_hard", ref_sppo_hard, {}),
    ("apo_zero", ref_apo_zero, {}),
    ("apo_down", ref_apo_down, {"beta": 0.2}),
    ("dpo_positive", ref_dpo_positive, {}),
    ("dpo_positive", ref_dpo_positive, {"beta": 0.2, "dpop_lambda": 5.0}),
    ("ln_dpo", ref_ln_dpo, {"beta": 2.0}),
    ("length_regularized_dpo", ref_length_regularized_dpo, {}),
    ("length_regularized_dpo", ref_length_regularized_dpo, {"alpha": 0.2}),
    ("rpo", ref_rpo, {}),
    ("rpo", ref_rpo, {"alpha": 0.3}),
]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("name,ref,hparams", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_paper_equation(name, ref, hparams, batch, dtype):
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=batch, seed=batch, dtype=dtype)
    # Several losses are flat at the factory's typical margins; widen the spread
    # so both sides of each nonlinearity are exercised.
    lp = synthetic.replace(lp, chosen=(lp.chosen * 0.2).astype(dtype), rejected=(lp.rejected * 0.2).astype(dtype))
    out = spec(lp, **hparams)
    assert out.losses.dtype == jnp.float32
    assert out.losses.shape == (batch,)
    np.testing.assert_allclose(np.asarray(out.losses), ref(lp, **hparams), rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("name", sorted({c[0] for c in CASES}))
def test_reward_metrics_follow_trl_names(name):
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=4)
    out = spec(lp)
    beta = spec.hparam_defaults["beta"]
    rw, rl, _ = _h(lp)
    if name == "ln_dpo":
        rw, rl = rw / as64(lp.chosen_len), rl / as64(lp.rejected_len)
    np.testing.assert_allclose(out.metrics["rewards/chosen"], beta * rw, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["rewards/rejected"], beta * rl, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["rewards/margins"], beta * (rw - rl), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out.metrics["rewards/accuracies"], (rw > rl).astype(np.float32))
    np.testing.assert_allclose(out.metrics["logps/chosen"], as64(lp.chosen), rtol=1e-6)


def test_dpo_zero_margin_is_log2():
    lp = losses.PairLogps(chosen=jnp.full(3, -5.0), rejected=jnp.full(3, -7.0),
                          ref_chosen=jnp.full(3, -5.0), ref_rejected=jnp.full(3, -7.0))
    np.testing.assert_allclose(losses.get("dpo")(lp).losses, np.log(2.0), rtol=1e-6)


def test_cdpo_and_robust_dpo_at_zero_noise_equal_dpo():
    spec = losses.get("dpo")
    lp = synthetic.make_inputs(spec, batch=16, seed=3)
    base = spec(lp, beta=0.3).losses
    np.testing.assert_allclose(spec(lp, beta=0.3, label_smoothing=0.0).losses, base, rtol=1e-6)
    np.testing.assert_allclose(losses.get("robust_dpo")(lp, beta=0.3, label_smoothing=0.0).losses, base, rtol=1e-6)


def test_robust_dpo_is_unbiased_under_label_flips():
    """E_flip[rDPO on noisy labels] equals clean DPO (the paper's Lemma 3.1)."""
    lp = synthetic.make_inputs(losses.get("dpo"), batch=32, seed=4)
    flipped = losses.PairLogps(chosen=lp.rejected, rejected=lp.chosen,
                               ref_chosen=lp.ref_rejected, ref_rejected=lp.ref_chosen)
    for eps in (0.1, 0.3, 0.45):
        rdpo = losses.get("robust_dpo")
        expected_noisy = (1 - eps) * rdpo(lp, label_smoothing=eps).losses + eps * rdpo(flipped, label_smoothing=eps).losses
        np.testing.assert_allclose(expected_noisy, losses.get("dpo")(lp).losses, rtol=1e-4, atol=1e-5)


def test_robust_dpo_rejects_noise_rate_at_or_above_half():
    lp = synthetic.make_inputs(losses.get("robust_dpo"), batch=2)
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        losses.get("robust_dpo")(lp, label_smoothing=0.5)


def test_ipo_minimum_sits_at_margin_one_over_two_beta():
    beta = 0.25
    grid = jnp.linspace(-2.0, 6.0, 8001)
    lp = losses.PairLogps(chosen=grid, rejected=jnp.zeros_like(grid),
                          ref_chosen=jnp.zeros_like(grid), ref_rejected=jnp.zeros_like(grid))
    values = losses.get("ipo")(lp, beta=beta).losses
    assert abs(float(grid[jnp.argmin(values)]) - 1 / (2 * beta)) < 2e-3
    grad = jax.grad(lambda c: losses.get("ipo")(
        losses.PairLogps(chosen=c, rejected=jnp.zeros(1), ref_chosen=jnp.zeros(1), ref_rejected=jnp.zeros(1)),
        beta=beta).losses.sum())
    np.testing.assert_allclose(grad(jnp.array([1 / (2 * beta)])), 0.0, atol=1e-6)


def test_hinge_is_zero_past_the_calibration_margin():
    beta = 0.5
    h = jnp.array([2.0 / beta, 1.0 / beta + 1e-3, 0.0])
    lp = losses.PairLogps(chosen=h, rejected=jnp.zeros(3), ref_chosen=jnp.zeros(3), ref_rejected=jnp.zeros(3))
    np.testing.assert_allclose(losses.get("hinge")(lp, beta=beta).losses, [0.0, 0.0, 1.0], atol=1e-6)


def test_exo_is_zero_when_policy_matches_smoothed_labels():
    eps, beta = 0.1, 0.5
    h = np.log((1 - eps) / eps) / beta  # sigma(beta h) = 1 - eps
    lp = losses.PairLogps(chosen=jnp.array([h]), rejected=jnp.zeros(1), ref_chosen=jnp.zeros(1), ref_rejected=jnp.zeros(1))
    np.testing.assert_allclose(losses.get("exo")(lp, beta=beta, label_smoothing=eps).losses, 0.0, atol=1e-6)


def test_dpo_positive_equals_dpo_when_chosen_above_reference():
    spec = losses.get("dpo_positive")
    lp = synthetic.make_inputs(spec, batch=8, seed=5)
    lp = synthetic.replace(lp, chosen=lp.ref_chosen + 1.0)
    np.testing.assert_allclose(spec(lp).losses, losses.get("dpo")(lp).losses, rtol=1e-6)


def test_length_regularized_dpo_at_zero_alpha_equals_dpo():
    spec = losses.get("length_regularized_dpo")
    lp = synthetic.make_inputs(spec, batch=8, seed=6)
    np.testing.assert_allclose(spec(lp, alpha=0.0).losses, losses.get("dpo")(lp).losses, rtol=1e-6)


def test_rpo_at_zero_alpha_equals_dpo():
    spec = losses.get("rpo")
    lp = synthetic.make_inputs(spec, batch=8, seed=7)
    np.testing.assert_allclose(spec(lp, alpha=0.0).losses, losses.get("dpo")(lp).losses, rtol=1e-6)
