"""f-DPO against the paper's equation, in numpy, and its limits.

The reference below is written from Wang et al. 2024 (f-DPO), eq. for the
loss -log sigma(beta f'(u_w) - beta f'(u_l)) with u = pi_theta / pi_ref and the f'
of Table 1 *including* their additive constants (which must cancel), in float64,
independently of prefjax.
"""

from __future__ import annotations

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
SPEC = losses.get("fdpo")


def _f_prime(u, divergence, alpha):
    """Table 1 of Wang et al. 2024: f'(u) for each divergence, constants kept."""
    if divergence == "reverse_kl":
        return np.log(u) + 1.0
    if divergence == "forward_kl":
        return -1.0 / u
    if divergence == "js":
        return np.log(2.0 * u / (1.0 + u))
    if divergence == "alpha":
        return (1.0 - u ** (-alpha)) / alpha
    raise AssertionError(divergence)


def ref_fdpo(lp, beta=0.1, divergence="reverse_kl", alpha=0.5):
    """f-DPO: -log sigma(beta f'(pi/pi_ref (y_w)) - beta f'(pi/pi_ref (y_l)))."""
    u_w = np.exp(as64(lp.chosen) - as64(lp.ref_chosen))
    u_l = np.exp(as64(lp.rejected) - as64(lp.ref_rejected))
    logits = beta * _f_prime(u_w, divergence, alpha) - beta * _f_prime(u_l, divergence, alpha)
    return -log_sigmoid(logits)


def _moderate_inputs(batch, seed, dtype=jnp.float32, scale=2.0):
    """Factory inputs with log-ratios ~ N(0, scale) so that every f' is exercised on both sides of u = 1."""
    lp = synthetic.make_inputs(SPEC, batch=batch, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    chosen = as64(lp.ref_chosen) + rng.normal(0.0, scale, batch)
    rejected = as64(lp.ref_rejected) + rng.normal(0.0, scale, batch)
    return synthetic.replace(lp, chosen=jnp.asarray(chosen, dtype), rejected=jnp.asarray(rejected, dtype))


CASES = [
    {},
    {"divergence": "reverse_kl", "beta": 0.5},
    {"divergence": "forward_kl"},
    {"divergence": "forward_kl", "beta": 0.3},
    {"divergence": "js"},
    {"divergence": "js", "beta": 1.0},
    {"divergence": "alpha"},
    {"divergence": "alpha", "alpha": 0.3, "beta": 0.2},
    {"divergence": "alpha", "alpha": 0.9},
    {"divergence": "alpha", "alpha": 1.0},
]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("hparams", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_paper_equation(hparams, batch, dtype):
    lp = _moderate_inputs(batch, seed=batch, dtype=dtype)
    out = SPEC(lp, **hparams)
    assert out.losses.dtype == jnp.float32 and out.losses.shape == (batch,)
    np.testing.assert_allclose(np.asarray(out.losses), ref_fdpo(lp, **hparams), rtol=3e-5, atol=3e-5)


def test_reverse_kl_is_dpo():
    lp = synthetic.make_inputs(SPEC, batch=32, seed=1)
    dpo = losses.get("dpo")(lp, beta=0.3)
    out = SPEC(lp, beta=0.3, divergence="reverse_kl")
    np.testing.assert_allclose(out.losses, dpo.losses, rtol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(out.metrics[key], dpo.metrics[key], rtol=1e-6)


@pytest.mark.parametrize("alpha", [1e-2, 1e-3, 1e-5])
def test_alpha_divergence_tends_to_reverse_kl(alpha):
    """(1 - u^-a)/a -> log u as a -> 0: the logits approach DPO's beta h."""
    lp = _moderate_inputs(32, seed=2)
    margins = SPEC(lp, divergence="alpha", alpha=alpha).metrics["rewards/margins"]
    dpo_margins = losses.get("dpo")(lp).metrics["rewards/margins"]
    # The gap is O(alpha rho^2 beta): rho ~ 2 here.
    np.testing.assert_allclose(margins, dpo_margins, rtol=0, atol=max(30 * alpha * 0.1, 2e-5))


@settings(max_examples=40, deadline=None)
@given(
    rho_w=st.floats(-30.0, 30.0),
    rho_l=st.floats(-30.0, 30.0),
    beta=st.floats(0.01, 2.0),
)
def test_alpha_one_is_forward_kl(rho_w, rho_l, beta):
    """At a = 1, f'(u) = 1 - 1/u: the forward-KL f' plus a constant, so the losses agree."""
    zeros = jnp.zeros(1)
    lp = losses.PairLogps(chosen=jnp.array([rho_w]), rejected=jnp.array([rho_l]),
                          ref_chosen=zeros, ref_rejected=zeros)
    a = SPEC(lp, beta=beta, divergence="alpha", alpha=1.0).losses
    f = SPEC(lp, beta=beta, divergence="forward_kl").losses
    np.testing.assert_allclose(a, f, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "alpha"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_finite_loss_and_grad_at_extreme_log_ratios(divergence, alpha):
    vals = jnp.array([1e4, -1e4, 0.0, 1e4, -1e4, 49.0, -51.0])
    others = jnp.array([-1e4, 1e4, 1e4, 1e4, -1e4, -49.0, 51.0])
    ref = jnp.zeros(7)

    def total(chosen, rejected):
        lp = losses.PairLogps(chosen=chosen, rejected=rejected, ref_chosen=ref - 1.0, ref_rejected=ref + 1.0)
        return SPEC(lp, divergence=divergence, alpha=alpha).losses.sum()

    value, (g_w, g_l) = jax.value_and_grad(total, argnums=(0, 1))(vals, others)
    assert np.isfinite(value)
    assert np.all(np.isfinite(g_w)) and np.all(np.isfinite(g_l))
    assert np.all(np.asarray(g_w) <= 0) and np.all(np.asarray(g_l) >= 0)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_gradient_signs(divergence):
    """Every f' is increasing, so raising log pi(y_w) lowers the loss, raising log pi(y_l) raises it."""
    lp = _moderate_inputs(16, seed=3)
    grads = jax.grad(lambda c, r: SPEC(synthetic.replace(lp, chosen=c, rejected=r),
                                       divergence=divergence).losses.sum(), argnums=(0, 1))
    g_w, g_l = grads(lp.chosen, lp.rejected)
    assert np.all(np.asarray(g_w) < 0) and np.all(np.asarray(g_l) > 0)


def test_js_chosen_reward_saturates_at_log2():
    """f'_JS(u) = log(2u/(1+u)) < log 2: the chosen reward saturates, unlike reverse KL."""
    lp = _moderate_inputs(8, seed=4)
    lp = synthetic.replace(lp, chosen=lp.ref_chosen + 1e3)
    rewards = SPEC(lp, beta=0.5, divergence="js").metrics["rewards/chosen"]
    np.testing.assert_allclose(rewards, 0.0, atol=1e-6)  # constants dropped: log 2 - log 2


def test_unknown_divergence_lists_valid_ones():
    lp = synthetic.make_inputs(SPEC, batch=2)
    with pytest.raises(ValueError, match="reverse_kl.*forward_kl.*js.*alpha"):
        SPEC(lp, divergence="hellinger")
    with pytest.raises(ValueError, match="alpha > 0"):
        SPEC(lp, divergence="alpha", alpha=0.0)


@pytest.mark.parametrize("divergence", ["forward_kl", "alpha"])
def test_jit_and_vmap(divergence):
    lp = _moderate_inputs(6, seed=5)
    eager = SPEC(lp, divergence=divergence).losses
    jitted = jax.jit(lambda x: SPEC(x, divergence=divergence).losses)(lp)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), lp)
    vmapped = jax.vmap(lambda x: SPEC(x, divergence=divergence).losses)(stacked)
    np.testing.assert_allclose(vmapped[1], eager, rtol=1e-6)
