"""ODPO and MODPO against their papers' equations, in numpy, and their special cases.

  * ODPO (Amini et al. 2024, eq. of the ODPO loss): -log sigma(beta h - Delta_r),
    Delta_r = alpha log(r(y_w) - r(y_l));
  * MODPO (Zhou et al. 2024, the MODPO loss): -log sigma((1/w_k)(beta h -
    w_{-k}^T (r_{-k}(y_w) - r_{-k}(y_l)))).

Both written in float64 numpy, independently of prefjax.
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
ODPO = losses.get("odpo")
MODPO = losses.get("modpo")


def _h(lp):
    return (as64(lp.chosen) - as64(lp.ref_chosen)) - (as64(lp.rejected) - as64(lp.ref_rejected))


def ref_odpo(lp, beta=0.1, alpha=1.0, scaling="log", offset_from="scores"):
    """ODPO: -log sigma(beta h - alpha f(s_w - s_l)), f = log (paper) or identity; or alpha * margin."""
    if offset_from == "margin":
        offset = alpha * as64(lp.margin)
    else:
        gap = as64(lp.score_chosen) - as64(lp.score_rejected)
        offset = alpha * (np.log(gap) if scaling == "log" else gap)
    return -log_sigmoid(beta * _h(lp) - offset)


def ref_modpo(lp, beta=0.1, weights=(0.5, 0.5)):
    """MODPO: -log sigma((1/w_k) [beta h - w_{-k} . (r_{-k}(y_w) - r_{-k}(y_l))])."""
    s_w, s_l = as64(lp.score_chosen), as64(lp.score_rejected)
    if s_w.ndim == 1:
        s_w, s_l = s_w[:, None], s_l[:, None]
    w = np.asarray(weights, np.float64)
    return -log_sigmoid((beta * _h(lp) - (s_w - s_l) @ w[1:]) / w[0])


def _spread(lp, dtype):
    """Moderate log-ratios (|rho| ~ 10) so the sigmoid is not saturated."""
    rng = np.random.default_rng(int(lp.chosen.shape[0]))
    n = lp.chosen.shape[0]
    return synthetic.replace(
        lp,
        chosen=jnp.asarray(as64(lp.ref_chosen) + rng.normal(0, 10, n), dtype),
        rejected=jnp.asarray(as64(lp.ref_rejected) + rng.normal(0, 10, n), dtype),
    )


def _with_multi_scores(lp, m, seed, dtype):
    rng = np.random.default_rng(seed)
    n = lp.chosen.shape[0]
    return synthetic.replace(lp, score_chosen=jnp.asarray(rng.normal(0, 2, (n, m)), dtype),
                             score_rejected=jnp.asarray(rng.normal(0, 2, (n, m)), dtype))


ODPO_CASES = [
    {},
    {"alpha": 0.5, "beta": 0.5},
    {"scaling": "identity", "alpha": 2.0},
    {"offset_from": "margin", "alpha": 0.7},
]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("hparams", ODPO_CASES, ids=[f"odpo{i}" for i in range(len(ODPO_CASES))])
def test_odpo_matches_paper_equation(hparams, batch, dtype):
    lp = _spread(synthetic.make_inputs(ODPO, batch=batch, seed=batch, dtype=dtype), dtype)
    out = ODPO(lp, **hparams)
    assert out.losses.dtype == jnp.float32 and out.losses.shape == (batch,)
    np.testing.assert_allclose(np.asarray(out.losses), ref_odpo(lp, **hparams), rtol=3e-5, atol=3e-5)


MODPO_CASES = [
    (None, {}),
    (None, {"beta": 0.5, "weights": (0.2, 0.8)}),
    (3, {"weights": (0.4, 0.3, 0.2, 0.1)}),
    (2, {"beta": 0.05, "weights": (1.0, -0.5, 2.0)}),
]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("m,hparams", MODPO_CASES, ids=[f"modpo{i}" for i in range(len(MODPO_CASES))])
def test_modpo_matches_paper_equation(m, hparams, batch, dtype):
    lp = _spread(synthetic.make_inputs(MODPO, batch=batch, seed=batch, dtype=dtype), dtype)
    if m is not None:
        lp = _with_multi_scores(lp, m, seed=batch, dtype=dtype)
    out = MODPO(lp, **hparams)
    assert out.losses.dtype == jnp.float32 and out.losses.shape == (batch,)
    np.testing.assert_allclose(np.asarray(out.losses), ref_modpo(lp, **hparams), rtol=3e-5, atol=3e-5)


def test_odpo_with_zero_alpha_is_dpo():
    lp = synthetic.make_inputs(ODPO, batch=16, seed=1)
    dpo = losses.get("dpo")(lp, beta=0.2).losses
    np.testing.assert_allclose(ODPO(lp, beta=0.2, alpha=0.0).losses, dpo, rtol=1e-6)
    np.testing.assert_allclose(ODPO(lp, beta=0.2, alpha=0.0, offset_from="margin").losses, dpo, rtol=1e-6)


@pytest.mark.parametrize("weights,m", [((1.0, 0.0), None), ((1.0, 0.0, 0.0), 2)])
def test_modpo_with_unit_weight_and_zero_margin_weights_is_dpo(weights, m):
    lp = synthetic.make_inputs(MODPO, batch=16, seed=2)
    if m is not None:
        lp = _with_multi_scores(lp, m, seed=2, dtype=jnp.float32)
    out = MODPO(lp, beta=0.3, weights=weights)
    dpo = losses.get("dpo")(lp, beta=0.3)
    np.testing.assert_allclose(out.losses, dpo.losses, rtol=1e-6)
    np.testing.assert_allclose(out.metrics["rewards/margins"], dpo.metrics["rewards/margins"], rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(w=st.floats(-3.0, 3.0), beta=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_modpo_with_w_k_one_is_odpo_with_identity_scaling(w, beta, seed):
    """With w_k = 1 and one margin model, MODPO's logit beta h - w (s_w - s_l) is ODPO's with f = identity."""
    lp = synthetic.make_inputs(MODPO, batch=8, seed=seed)
    modpo = MODPO(lp, beta=beta, weights=(1.0, w)).losses
    odpo = ODPO(lp, beta=beta, alpha=w, scaling="identity").losses
    np.testing.assert_allclose(modpo, odpo, rtol=1e-5, atol=1e-6)


def test_odpo_offset_grows_with_the_score_gap():
    """A larger quality gap demands a larger margin: same h, larger gap -> larger loss (alpha > 0)."""
    zeros = jnp.zeros(3)
    lp = losses.PairLogps(chosen=jnp.full(3, 2.0), rejected=zeros, ref_chosen=zeros, ref_rejected=zeros,
                          score_chosen=jnp.array([1.5, 3.0, 10.0]), score_rejected=jnp.ones(3))
    values = np.asarray(ODPO(lp).losses)
    assert values[0] < values[1] < values[2]
    np.testing.assert_allclose(ODPO(lp).metrics["odpo/offset"], np.log([0.5, 2.0, 9.0]), rtol=1e-6)


def test_odpo_nonpositive_score_gap_is_clipped_and_finite():
    zeros = jnp.zeros(3)

    def total(chosen):
        lp = losses.PairLogps(chosen=chosen, rejected=zeros, ref_chosen=zeros, ref_rejected=zeros,
                              score_chosen=jnp.array([0.3, 0.5, -2.0]),
                              score_rejected=jnp.array([0.3, 1.0, 5.0]))
        return ODPO(lp).losses.sum(), ODPO(lp).metrics["odpo/offset"]

    (value, offset), grad = jax.value_and_grad(total, has_aux=True)(jnp.array([1.0, -1e4, 1e4]))
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(offset, np.log(1e-6), rtol=1e-6)


@pytest.mark.parametrize("name", ["odpo", "modpo"])
def test_gradient_sign_in_chosen_and_extremes(name):
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=6, seed=3)
    chosen = jnp.array([-1e4, -1e4, -5.0, -20.0, -1e4, -3.0])
    rejected = jnp.array([-1e4, -1.0, -1e4, -20.0, -2.0, -1e4])

    def total(c, r):
        return spec(synthetic.replace(lp, chosen=c, rejected=r)).losses.sum()

    value = total(chosen, rejected)
    g_w, g_l = jax.grad(total, argnums=(0, 1))(chosen, rejected)
    assert np.isfinite(value) and np.all(np.isfinite(g_w)) and np.all(np.isfinite(g_l))
    assert np.all(np.asarray(g_w) <= 0) and np.all(np.asarray(g_l) >= 0)
    g_w, _ = jax.grad(total, argnums=(0, 1))(lp.chosen, lp.rejected)
    assert np.all(np.asarray(g_w) <= 0)


def test_modpo_weights_must_match_the_number_of_margin_models():
    lp = _with_multi_scores(synthetic.make_inputs(MODPO, batch=4), 3, seed=0, dtype=jnp.float32)
    with pytest.raises(ValueError, match="modpo.*score_chosen"):
        MODPO(lp, weights=(0.5, 0.5))
    with pytest.raises(ValueError, match="modpo.*score_chosen"):
        MODPO(synthetic.make_inputs(MODPO, batch=4), weights=(0.5, 0.25, 0.25))
    with pytest.raises(ValueError, match="w_k"):
        MODPO(lp, weights=(0.0, 0.5, 0.3, 0.2))


def test_odpo_input_requirements():
    lp = synthetic.make_inputs(losses.get("dpo"), batch=4)
    with pytest.raises(losses.LossInputError, match="odpo.*score_chosen"):
        ODPO(lp)
    with pytest.raises(losses.LossInputError, match="odpo.*margin"):
        ODPO(lp, offset_from="margin")
    # offset_from="margin" needs no scores at all.
    with_margin = synthetic.replace(lp, margin=jnp.full(4, 0.5))
    np.testing.assert_allclose(ODPO(with_margin, offset_from="margin").losses,
                               ref_odpo(with_margin, offset_from="margin"), rtol=1e-5)
    multi = _with_multi_scores(lp, 2, seed=0, dtype=jnp.float32)
    with pytest.raises(losses.LossInputError, match="odpo.*\\[B\\]"):
        ODPO(multi)
    with pytest.raises(ValueError, match="log.*identity"):
        ODPO(synthetic.make_inputs(ODPO, batch=2), scaling="sqrt")
    with pytest.raises(ValueError, match="scores.*margin"):
        ODPO(synthetic.make_inputs(ODPO, batch=2), offset_from="labels")


@pytest.mark.parametrize("name", ["odpo", "modpo"])
def test_jit_matches_eager(name):
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=5, seed=4)
    np.testing.assert_allclose(jax.jit(lambda x: spec(x).losses)(lp), spec(lp).losses, rtol=1e-6)
