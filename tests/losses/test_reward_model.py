"""Reward-model losses against their papers' equations, in numpy.

Bradley-Terry with margin (Llama 2 / TRL), scaled (HelpSteer2-Preference) and
centering (Eisenstein et al. eq. 2); rating regression (HelpSteer2 / SteerLM).
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


def ref_bradley_terry(rp, use_margin=True, scaled=False, center_rewards_coefficient=0.0):
    """-log s(r_w - r_l - m); scaled: -m log s(r_w - r_l); plus c (r_w + r_l)^2."""
    r_w, r_l = as64(rp.chosen), as64(rp.rejected)
    m = as64(rp.margin) if rp.margin is not None else np.zeros_like(r_w)
    if scaled:
        loss = -m * log_sigmoid(r_w - r_l)
    elif use_margin:
        loss = -log_sigmoid(r_w - r_l - m)
    else:
        loss = -log_sigmoid(r_w - r_l)
    return loss + center_rewards_coefficient * (r_w + r_l) ** 2


def ref_rating_regression(rr, attribute_reduction="mean"):
    """Squared error over rated attributes; mean: divided by the number rated (0 if none)."""
    p, t = as64(rr.predicted), as64(rr.target)
    rated = np.asarray(rr.mask) > 0 if rr.mask is not None else np.ones(p.shape, bool)
    out = []
    for i in range(p.shape[0]):
        sq = (p[i][rated[i]] - t[i][rated[i]]) ** 2
        if attribute_reduction == "sum":
            out.append(sq.sum())
        else:
            out.append(sq.mean() if sq.size else 0.0)
    return np.array(out)


BT_CASES = [
    {},
    {"use_margin": False},
    {"scaled": True},
    {"center_rewards_coefficient": 0.01},
    {"scaled": True, "center_rewards_coefficient": 0.1},
]
RATING_CASES = [{}, {"attribute_reduction": "sum"}]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("hparams", BT_CASES, ids=[str(i) for i in range(len(BT_CASES))])
def test_bradley_terry_matches_equation(hparams, batch, dtype):
    spec = losses.get("bradley_terry")
    rp = synthetic.make_inputs(spec, batch=batch, seed=batch, dtype=dtype)
    assert rp.margin is not None
    out = spec(rp, **hparams)
    assert out.losses.dtype == jnp.float32 and out.losses.shape == (batch,)
    expected = ref_bradley_terry(rp, **hparams)
    np.testing.assert_allclose(np.asarray(out.losses), expected, rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("hparams", RATING_CASES, ids=["mean", "sum"])
def test_rating_regression_matches_equation(hparams, batch, dtype):
    spec = losses.get("rating_regression")
    rr = synthetic.make_inputs(spec, batch=batch, seed=batch, dtype=dtype)
    out = spec(rr, **hparams)
    assert out.losses.dtype == jnp.float32 and out.losses.shape == (batch,)
    expected = ref_rating_regression(rr, **hparams)
    np.testing.assert_allclose(np.asarray(out.losses), expected, rtol=3e-5, atol=3e-5)


def test_bradley_terry_metrics():
    spec = losses.get("bradley_terry")
    rp = synthetic.make_inputs(spec, batch=9, seed=1)
    out = spec(rp)
    np.testing.assert_allclose(out.metrics["rewards/chosen"], as64(rp.chosen), rtol=1e-6)
    np.testing.assert_allclose(out.metrics["rewards/rejected"], as64(rp.rejected), rtol=1e-6)
    r_w, r_l = as64(rp.chosen), as64(rp.rejected)
    np.testing.assert_allclose(out.metrics["rewards/margins"], r_w - r_l, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.metrics["rewards/accuracies"], (r_w > r_l).astype(np.float32))
    p_chosen = 1.0 / (1.0 + np.exp(-(r_w - r_l)))  # calibration: Bradley-Terry's P(chosen wins)
    np.testing.assert_allclose(out.metrics["rewards/chosen_probability"], p_chosen, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.metrics["rewards/brier"], (1.0 - p_chosen) ** 2, rtol=1e-4, atol=1e-6)


def test_zero_margin_and_missing_margin_equal_plain_bt():
    spec = losses.get("bradley_terry")
    rp = synthetic.make_inputs(spec, batch=16, seed=2)
    plain = spec(rp, use_margin=False).losses
    np.testing.assert_allclose(spec(synthetic.replace(rp, margin=jnp.zeros(16))).losses, plain, rtol=1e-6)
    np.testing.assert_allclose(spec(synthetic.replace(rp, margin=None)).losses, plain, rtol=1e-6)
    # Scaled BT with unit strength is plain BT too.
    unit = synthetic.replace(rp, margin=jnp.ones(16))
    np.testing.assert_allclose(spec(unit, scaled=True).losses, plain, rtol=1e-6)


def test_bradley_terry_zero_gap_is_log2():
    rp = losses.RewardPair(chosen=jnp.full(3, 1.5), rejected=jnp.full(3, 1.5))
    np.testing.assert_allclose(losses.get("bradley_terry")(rp).losses, np.log(2.0), rtol=1e-6)


def test_scaled_bradley_terry_needs_margin_column():
    rp = losses.RewardPair(chosen=jnp.zeros(2), rejected=jnp.zeros(2))
    with pytest.raises(ValueError, match="preference strength"):
        losses.get("bradley_terry")(rp, scaled=True)


def test_scaled_bt_equals_repeating_the_pair_m_times():
    """HelpSteer2-Preference's reading: strength m weighs the pair as m copies of plain BT."""
    spec = losses.get("bradley_terry")
    rp = synthetic.make_inputs(spec, batch=6, seed=3)
    strength = jnp.array([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    scaled = spec(synthetic.replace(rp, margin=strength), scaled=True).losses
    np.testing.assert_allclose(scaled, strength * spec(rp, use_margin=False).losses, rtol=1e-6)


def _grads(name, inputs, fields, **hparams):
    spec = losses.get(name)

    def total(values):
        return spec(synthetic.replace(inputs, **values), **hparams).losses.sum()

    return jax.grad(total)({f: getattr(inputs, f) for f in fields})


@pytest.mark.parametrize("hparams", BT_CASES[:3], ids=["margin", "plain", "scaled"])
def test_bradley_terry_gradient_signs(hparams):
    rp = synthetic.make_inputs(losses.get("bradley_terry"), batch=32, seed=4)
    grads = _grads("bradley_terry", rp, ("chosen", "rejected"), **hparams)
    assert np.all(np.asarray(grads["chosen"]) < 0)
    assert np.all(np.asarray(grads["rejected"]) > 0)


def test_centering_pulls_reward_sum_to_zero():
    spec = losses.get("bradley_terry")
    rp = losses.RewardPair(chosen=jnp.array([10.0, -8.0]), rejected=jnp.array([9.0, -9.0]))
    base = spec(rp).losses
    centered = spec(rp, center_rewards_coefficient=0.01).losses
    np.testing.assert_allclose(centered - base, 0.01 * np.array([19.0, -17.0]) ** 2, rtol=1e-5)
    grads = _grads("bradley_terry", rp, ("chosen",), center_rewards_coefficient=1.0)
    assert grads["chosen"][0] > 0 and grads["chosen"][1] < 0  # both move the sum toward 0


def test_bradley_terry_extremes_are_finite():
    spec = losses.get("bradley_terry")
    rp = losses.RewardPair(chosen=jnp.array([1e4, -1e4, 0.0]), rejected=jnp.array([-1e4, 1e4, 0.0]),
                           margin=jnp.array([1e4, -1e4, 0.0]))
    for hparams in BT_CASES:
        out = spec(rp, **hparams)
        assert np.all(np.isfinite(out.losses))
        grads = _grads("bradley_terry", rp, ("chosen", "rejected"), **hparams)
        assert all(np.all(np.isfinite(g)) for g in grads.values())


def test_rating_regression_gradient_and_minimum():
    spec = losses.get("rating_regression")
    rr = synthetic.make_inputs(spec, batch=8, seed=5)
    np.testing.assert_allclose(spec(synthetic.replace(rr, predicted=rr.target)).losses, 0.0, atol=1e-7)
    grad = np.asarray(_grads("rating_regression", rr, ("predicted",))["predicted"])
    rated = np.asarray(rr.mask) > 0
    diff = as64(rr.predicted) - as64(rr.target)
    # Over-predictions are pushed down, under-predictions up; unrated entries get no gradient.
    assert np.all(np.sign(grad[rated]) == np.sign(diff[rated]))
    np.testing.assert_array_equal(grad[~rated], 0.0)


def test_rating_regression_ignores_unrated_garbage_and_empty_rows():
    spec = losses.get("rating_regression")
    mask = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    predicted = jnp.array([[1.0, jnp.nan, 3.0], [jnp.inf, 2.0, 0.0]])
    target = jnp.array([[2.0, jnp.nan, 3.0], [1.0, -jnp.inf, 0.0]])
    rr = losses.RatedResponses(predicted=predicted, target=target, mask=mask)
    out = spec(rr)
    np.testing.assert_allclose(out.losses, [0.5, 0.0])
    np.testing.assert_allclose(out.metrics["rating/mae"], [0.5, 0.0])
    grads = _grads("rating_regression", rr, ("predicted",))
    assert np.all(np.isfinite(np.asarray(grads["predicted"])))


def test_rating_regression_without_mask_uses_every_attribute():
    spec = losses.get("rating_regression")
    rr = losses.RatedResponses(predicted=jnp.array([[1.0, 2.0]]), target=jnp.array([[0.0, 0.0]]))
    np.testing.assert_allclose(spec(rr).losses, [2.5])
    np.testing.assert_allclose(spec(rr, attribute_reduction="sum").losses, [5.0])
    with pytest.raises(ValueError, match="attribute_reduction"):
        spec(rr, attribute_reduction="median")


@settings(max_examples=40, deadline=None)
@given(r_w=st.floats(-100, 100), r_l=st.floats(-100, 100), shift=st.floats(-100, 100))
def test_bradley_terry_is_shift_invariant_without_centering(r_w, r_l, shift):
    """Only reward differences enter BT: adding a constant to both rewards changes nothing."""
    spec = losses.get("bradley_terry")
    base = spec(losses.RewardPair(chosen=jnp.array([r_w]), rejected=jnp.array([r_l]))).losses
    moved = spec(losses.RewardPair(chosen=jnp.array([r_w + shift]), rejected=jnp.array([r_l + shift]))).losses
    np.testing.assert_allclose(moved, base, rtol=1e-4, atol=1e-4)
