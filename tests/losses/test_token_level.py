"""TDPO1 and TDPO2 against the equations of Zeng et al. 2024, in numpy.

The references below sum the per-position KL over response tokens with a
python loop over rows (independently of prefjax's masked sum) and evaluate
-log sigma(u - delta) from the paper's definitions of u and delta.
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


def _seq_kl(token_kl, mask):
    """D_SeqKL(x, y; pi_ref || pi_theta): sum of the per-position KL over response tokens."""
    token_kl, mask = as64(token_kl), np.asarray(mask, np.float64)
    return np.array([token_kl[i][mask[i] > 0].sum() for i in range(token_kl.shape[0])])


def _u_and_kls(lp, beta):
    """u = beta log(pi/pi_ref)(y_w) - beta log(pi/pi_ref)(y_l); D(y_w); D(y_l)."""
    u = beta * ((as64(lp.chosen) - as64(lp.ref_chosen)) - (as64(lp.rejected) - as64(lp.ref_rejected)))
    return u, _seq_kl(lp.chosen_token_kl, lp.chosen_mask), _seq_kl(lp.rejected_token_kl, lp.rejected_mask)


def ref_tdpo1(lp, beta=0.1):
    """TDPO1: -log sigma(u - delta), delta = beta D(y_l) - beta D(y_w)."""
    u, d_w, d_l = _u_and_kls(lp, beta)
    return -log_sigmoid(u - (beta * d_l - beta * d_w))


def ref_tdpo2(lp, beta=0.1, alpha=0.5):
    """TDPO2: -log sigma(u - alpha delta_2), delta_2 = beta D(y_l) - sg(beta D(y_w)) (value only)."""
    u, d_w, d_l = _u_and_kls(lp, beta)
    return -log_sigmoid(u - alpha * (beta * d_l - beta * d_w))


CASES = [
    ("tdpo1", ref_tdpo1, {}),
    ("tdpo1", ref_tdpo1, {"beta": 0.5}),
    ("tdpo2", ref_tdpo2, {}),
    ("tdpo2", ref_tdpo2, {"beta": 0.3, "alpha": 1.5}),
]


def _inputs(name, batch, seed=0, dtype=jnp.float32):
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=batch, seed=seed, dtype=dtype)
    # Spread the margins so both sides of the sigmoid are exercised.
    spread = {"chosen": (lp.chosen * 0.2).astype(dtype), "rejected": (lp.rejected * 0.2).astype(dtype)}
    return spec, synthetic.replace(lp, **spread)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("name,ref,hparams", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_paper_equation(name, ref, hparams, batch, dtype):
    spec, lp = _inputs(name, batch, seed=batch, dtype=dtype)
    out = spec(lp, **hparams)
    assert out.losses.dtype == jnp.float32
    assert out.losses.shape == (batch,)
    np.testing.assert_allclose(np.asarray(out.losses), ref(lp, **hparams), rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("name", ["tdpo1", "tdpo2"])
def test_metrics(name):
    spec, lp = _inputs(name, 6, seed=1)
    out = spec(lp)
    rw = as64(lp.chosen) - as64(lp.ref_chosen)
    rl = as64(lp.rejected) - as64(lp.ref_rejected)
    d_w, d_l = _seq_kl(lp.chosen_token_kl, lp.chosen_mask), _seq_kl(lp.rejected_token_kl, lp.rejected_mask)
    # DPO's implicit rewards, comparable across losses; the KL parts are separate metrics.
    np.testing.assert_allclose(out.metrics["rewards/chosen"], 0.1 * rw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.metrics["rewards/rejected"], 0.1 * rl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.metrics["kl/chosen"], d_w, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["kl/rejected"], d_l, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["kl/margin"], d_w - d_l, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.metrics["logps/chosen"], as64(lp.chosen), rtol=1e-6)
    for value in out.metrics.values():
        assert value.shape == (6,)


def test_tdpo1_equals_dpo_when_sequential_kls_are_equal():
    spec, lp = _inputs("tdpo1", 16, seed=2)
    lp = synthetic.replace(lp, rejected_token_kl=lp.chosen_token_kl, rejected_mask=lp.chosen_mask)
    for beta in (0.1, 0.7):
        dpo = losses.get("dpo")(lp, beta=beta).losses
        np.testing.assert_allclose(spec(lp, beta=beta).losses, dpo, rtol=1e-6)
        np.testing.assert_allclose(losses.get("tdpo2")(lp, beta=beta).losses, dpo, rtol=1e-6)


def test_tdpo2_with_alpha_one_has_tdpo1_value():
    spec, lp = _inputs("tdpo2", 16, seed=3)
    np.testing.assert_allclose(spec(lp, alpha=1.0).losses, losses.get("tdpo1")(lp).losses, rtol=1e-6)


def _grad(name, lp, field, **hparams):
    spec = losses.get(name)

    def total(value):
        return spec(synthetic.replace(lp, **{field: value}), **hparams).losses.sum()

    return np.asarray(jax.grad(total)(getattr(lp, field)))


def test_tdpo2_stops_gradient_through_chosen_kl_but_tdpo1_does_not():
    _, lp = _inputs("tdpo1", 8, seed=4)
    mask = np.asarray(lp.chosen_mask) > 0
    g1 = _grad("tdpo1", lp, "chosen_token_kl")
    g2 = _grad("tdpo2", lp, "chosen_token_kl")
    np.testing.assert_array_equal(g2, 0.0)
    assert np.all(g1[mask] < 0)  # a larger D(y_w) raises u - delta
    # Both still push the rejected KL down.
    assert np.all(_grad("tdpo1", lp, "rejected_token_kl")[np.asarray(lp.rejected_mask) > 0] > 0)
    assert np.all(_grad("tdpo2", lp, "rejected_token_kl")[np.asarray(lp.rejected_mask) > 0] > 0)


@pytest.mark.parametrize("name", ["tdpo1", "tdpo2"])
def test_gradient_signs_on_sequence_logps(name):
    _, lp = _inputs(name, 8, seed=5)
    assert np.all(_grad(name, lp, "chosen") < 0)
    assert np.all(_grad(name, lp, "rejected") > 0)


@pytest.mark.parametrize("name", ["tdpo1", "tdpo2"])
def test_masked_positions_are_ignored_even_when_nan(name):
    spec, lp = _inputs(name, 8, seed=6)
    clean = spec(lp).losses
    garbage_w = jnp.where(lp.chosen_mask > 0, lp.chosen_token_kl, jnp.nan)
    garbage_l = jnp.where(lp.rejected_mask > 0, lp.rejected_token_kl, jnp.inf)
    dirty = synthetic.replace(lp, chosen_token_kl=garbage_w, rejected_token_kl=garbage_l)
    np.testing.assert_allclose(spec(dirty).losses, clean, rtol=1e-6)
    for field in ("chosen_token_kl", "rejected_token_kl"):
        grad = _grad(name, dirty, field)
        assert np.all(np.isfinite(grad))
        mask_field = "chosen_mask" if field.startswith("chosen") else "rejected_mask"
        np.testing.assert_array_equal(grad[np.asarray(getattr(lp, mask_field)) == 0], 0.0)


@pytest.mark.parametrize("name", ["tdpo1", "tdpo2"])
def test_extreme_inputs_stay_finite(name):
    spec, lp = _inputs(name, 4, seed=7)
    lp = synthetic.replace(
        lp,
        chosen=jnp.array([-1e4, 0.0, -1e4, -5.0]),
        rejected=jnp.array([0.0, -1e4, -1e4, -5.0]),
        chosen_token_kl=lp.chosen_token_kl.at[0].set(1e3),
    )
    out = spec(lp)
    assert np.all(np.isfinite(out.losses))
    for field in ("chosen", "rejected", "chosen_token_kl", "rejected_token_kl"):
        assert np.all(np.isfinite(_grad(name, lp, field)))


def test_jit_and_vmap_agree():
    spec, lp = _inputs("tdpo2", 5, seed=8)
    eager = spec(lp).losses
    np.testing.assert_allclose(jax.jit(lambda x: spec(x).losses)(lp), eager, rtol=1e-6)
    # vmap over a leading axis of two stacked batches.
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), lp)
    np.testing.assert_allclose(jax.vmap(lambda x: spec(x).losses)(stacked)[1], eager, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    shift=st.floats(-50.0, 50.0),
    kl_w=st.floats(0.0, 30.0),
    kl_l=st.floats(0.0, 30.0),
)
def test_tdpo1_is_dpo_with_kl_shifted_margin(shift, kl_w, kl_l):
    """TDPO1(h; D_w, D_l) = DPO(h + D_w - D_l): the KL gap acts as a margin offset."""
    ones = jnp.ones((1, 1))
    lp = losses.PairLogps(
        chosen=jnp.array([shift]), rejected=jnp.zeros(1), ref_chosen=jnp.zeros(1), ref_rejected=jnp.zeros(1),
        chosen_token_kl=kl_w * ones, rejected_token_kl=kl_l * ones, chosen_mask=ones, rejected_mask=ones,
    )
    shifted = losses.PairLogps(
        chosen=jnp.array([shift + kl_w - kl_l]), rejected=jnp.zeros(1),
        ref_chosen=jnp.zeros(1), ref_rejected=jnp.zeros(1),
    )
    np.testing.assert_allclose(
        losses.get("tdpo1")(lp).losses, losses.get("dpo")(shifted).losses, rtol=1e-5, atol=1e-6
    )
