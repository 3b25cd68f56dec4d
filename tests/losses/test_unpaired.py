"""Binary-feedback losses (KTO, BCO, NPO) and paired BCO against their papers' equations.

Each `ref_*` function below is written from the paper's equation (cited in its
docstring) in float64 numpy, independently of prefjax. The stateful BCO losses
are checked over several steps against a numpy cumulative mean.
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
from tests.losses.numpy_ref import as64, log_sigmoid, sigmoid

BATCHES = (1, 7, 64)
DTYPES = (jnp.float32, jnp.bfloat16)
TOL = dict(rtol=3e-5, atol=3e-5)
SIZE = 7  # batch size of the property tests: one of BATCHES, so shapes compile once


# ------------------------------------------------------------------ numpy references


def _labels(up) -> np.ndarray:
    return np.asarray(up.label).astype(bool)


def _real(up) -> np.ndarray:
    """Examples that are not padding (weight > 0)."""
    if up.weight is None:
        return np.ones(np.shape(up.logps), bool)
    return np.asarray(up.weight) > 0


def ref_kto(up, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024): lambda_y - v(x, y) with
    v = lambda_D sigma(beta (r - z0)) for desirable y, lambda_U sigma(beta (z0 - r)) otherwise,
    z0 = max(0, mean over real examples of log pi_theta(y'|x) / pi_ref(y'|x)) on mismatched pairs.
    """
    real = _real(up)
    kl = (as64(up.kl_logps) - as64(up.ref_kl_logps))[real]
    z0 = max(0.0, kl.mean()) if kl.size else 0.0
    r = as64(up.logps) - as64(up.ref_logps)
    v = np.where(
        _labels(up),
        desirable_weight * sigmoid(beta * (r - z0)),
        undesirable_weight * sigmoid(beta * (z0 - r)),
    )
    lam = np.where(_labels(up), desirable_weight, undesirable_weight)
    return lam - v, z0


def ref_bco_steps(batches, beta=0.1, mean0=0.0, count0=0.0):
    """BCO (Jung et al. 2024): -log sigma(r - delta) for desirable, -log sigma(-(r - delta))
    for undesirable, r = beta log pi_theta/pi_ref, delta = mean of every real r seen so far
    (this batch included). Returns per-batch losses and the final (mean, count).
    """
    seen_sum, seen_n = mean0 * count0, count0
    out = []
    for up in batches:
        r = beta * (as64(up.logps) - as64(up.ref_logps))
        real = _real(up)
        seen_sum += r[real].sum()
        seen_n += real.sum()
        delta = seen_sum / seen_n if seen_n else 0.0
        out.append(np.where(_labels(up), -log_sigmoid(r - delta), -log_sigmoid(-(r - delta))))
    return out, (seen_sum / seen_n if seen_n else 0.0, seen_n)


def ref_bco_pair_steps(batches, beta=0.1, mean0=0.0, count0=0.0):
    """Paired BCO (TRL's bco_pair): -log sigma(r_w - delta) - log sigma(-(r_l - delta)),
    delta = mean of every r_w and r_l seen so far (this batch included).
    """
    seen_sum, seen_n = mean0 * count0, count0
    out = []
    for lp in batches:
        r_w = beta * (as64(lp.chosen) - as64(lp.ref_chosen))
        r_l = beta * (as64(lp.rejected) - as64(lp.ref_rejected))
        seen_sum += r_w.sum() + r_l.sum()
        seen_n += 2 * r_w.size
        delta = seen_sum / seen_n
        out.append(-log_sigmoid(r_w - delta) - log_sigmoid(-(r_l - delta)))
    return out, (seen_sum / seen_n, seen_n)


def ref_npo(up, beta=0.1, retain_weight=0.0):
    """NPO (Zhang et al. 2024, eq. 3): -(2/beta) log sigma(-beta log pi_theta/pi_ref) on the
    forget set; NPO+RT adds retain_weight * token-mean NLL on the retain set.
    """
    r = as64(up.logps) - as64(up.ref_logps)
    nll = -as64(up.logps) / np.maximum(as64(up.length), 1.0)
    return np.where(_labels(up), retain_weight * nll, -(2.0 / beta) * log_sigmoid(-beta * r))


# ---------------------------------------------------------------------- input helpers


def _unpaired(name, batch, seed, dtype=jnp.float32):
    """Factory inputs with random labels (the factory alternates them)."""
    spec = losses.get(name)
    up = synthetic.make_inputs(spec, batch=batch, seed=seed, dtype=dtype)
    labels = np.random.default_rng(seed + 100).uniform(size=batch) < 0.5
    return spec, synthetic.replace(up, label=jnp.asarray(labels))


def _state(mean, count):
    return {"mean": jnp.float32(mean), "count": jnp.float32(count)}


def _grad_wrt(spec, inputs, field, state=None, **hparams):
    """d(sum of losses)/d(field), per example."""

    def total(values):
        x = dataclasses.replace(inputs, **{field: values})
        out = spec(x, state, **hparams) if spec.stateful else spec(x, **hparams)
        return out.losses.sum()

    return np.asarray(jax.grad(total)(getattr(inputs, field)))


# ------------------------------------------------------------------ equation parity


KTO_CASES = [{}, {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7}]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("hparams", KTO_CASES, ids=["default", "custom"])
@pytest.mark.parametrize("kl_shift", [0.0, 40.0], ids=["z0-clamped", "z0-positive"])
def test_kto_matches_paper(batch, dtype, hparams, kl_shift):
    spec, up = _unpaired("kto", batch, seed=batch)
    # kl_shift > 0 makes the mismatched-pair log-ratio positive on average, so z0 > 0.
    up = synthetic.replace(
        up,
        logps=up.logps.astype(dtype),
        ref_logps=up.ref_logps.astype(dtype),
        kl_logps=(up.kl_logps + kl_shift).astype(dtype),
        ref_kl_logps=up.ref_kl_logps.astype(dtype),
    )
    out = spec(up, **hparams)
    expected, z0 = ref_kto(up, **hparams)
    assert out.losses.dtype == jnp.float32 and out.losses.shape == (batch,)
    np.testing.assert_allclose(out.losses, expected, **TOL)
    np.testing.assert_allclose(out.metrics["kto/kl"], np.full(batch, z0), **TOL)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_bco_matches_paper_from_nontrivial_state(batch, dtype, beta):
    spec, up = _unpaired("bco", batch, seed=batch)
    up = synthetic.replace(up, logps=up.logps.astype(dtype), ref_logps=up.ref_logps.astype(dtype))
    out = spec(up, _state(0.3, 10.0), beta=beta)
    [expected], (mean, count) = ref_bco_steps([up], beta=beta, mean0=0.3, count0=10.0)
    np.testing.assert_allclose(out.losses, expected, **TOL)
    np.testing.assert_allclose(out.state["mean"], mean, **TOL)
    assert float(out.state["count"]) == count


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_bco_pair_matches_paper(batch, dtype):
    spec = losses.get("bco_pair")
    lp = synthetic.make_inputs(spec, batch=batch, seed=batch, dtype=dtype)
    out = spec(lp, _state(-0.2, 4.0), beta=0.2)
    [expected], (mean, count) = ref_bco_pair_steps([lp], beta=0.2, mean0=-0.2, count0=4.0)
    np.testing.assert_allclose(out.losses, expected, **TOL)
    np.testing.assert_allclose(out.state["mean"], mean, **TOL)
    assert float(out.state["count"]) == count


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("hparams", [{}, {"beta": 0.5, "retain_weight": 1.0}], ids=["npo", "npo+rt"])
def test_npo_matches_paper(batch, dtype, hparams):
    spec, up = _unpaired("npo", batch, seed=batch)
    up = synthetic.replace(up, logps=up.logps.astype(dtype), ref_logps=up.ref_logps.astype(dtype))
    out = spec(up, **hparams)
    np.testing.assert_allclose(out.losses, ref_npo(up, **hparams), **TOL)


# ------------------------------------------------------------------------------ KTO


def test_kto_z0_ignores_padding_examples():
    spec, up = _unpaired("kto", 64, seed=1)
    up = synthetic.replace(up, kl_logps=up.kl_logps + 30.0)  # z0 > 0, so padding would show
    pad = np.arange(64) >= SIZE
    # Padding rows carry garbage (even NaN) in the KL columns; z0 must not see them.
    padded = synthetic.replace(
        up,
        kl_logps=jnp.where(pad, jnp.nan, up.kl_logps),
        ref_kl_logps=jnp.where(pad, 1e4, up.ref_kl_logps),
        weight=jnp.asarray(~pad, jnp.float32),
    )
    trimmed = jax.tree_util.tree_map(lambda x: x[:SIZE], up)
    out_padded, out_trimmed = spec(padded), spec(trimmed)
    np.testing.assert_allclose(out_padded.losses[:SIZE], out_trimmed.losses, rtol=1e-6)
    np.testing.assert_allclose(out_padded.metrics["kto/kl"][:SIZE], out_trimmed.metrics["kto/kl"], rtol=1e-6)
    assert float(out_trimmed.metrics["kto/kl"][0]) > 0


def test_kto_z0_ignores_weight_magnitude():
    """Weights mark padding and weight the loss; they do not reweight the KL estimate."""
    spec, up = _unpaired("kto", SIZE, seed=2)
    up = synthetic.replace(up, kl_logps=up.kl_logps + 30.0)
    reweighted = synthetic.replace(up, weight=jnp.linspace(0.1, 5.0, SIZE))
    np.testing.assert_allclose(spec(reweighted).losses, spec(up).losses, rtol=1e-6)


def test_kto_z0_is_clamped_at_zero():
    spec, up = _unpaired("kto", SIZE, seed=3)
    up = synthetic.replace(up, kl_logps=up.ref_kl_logps - 5.0)  # estimated KL = -5
    out = spec(up)
    np.testing.assert_array_equal(out.metrics["kto/kl"], 0.0)
    r = as64(up.logps) - as64(up.ref_logps)
    expected = np.where(_labels(up), 1 - sigmoid(0.1 * r), 1 - sigmoid(-0.1 * r))
    np.testing.assert_allclose(out.losses, expected, **TOL)


def test_kto_all_padding_batch_gives_z0_zero():
    spec, up = _unpaired("kto", SIZE, seed=4)
    out = spec(synthetic.replace(up, weight=jnp.zeros(SIZE)))
    np.testing.assert_array_equal(out.metrics["kto/kl"], 0.0)
    assert np.isfinite(np.asarray(out.losses)).all()


@settings(max_examples=40, deadline=None)
@given(
    rho=st.lists(st.floats(-1e4, 1e4), min_size=SIZE, max_size=SIZE),
    kl=st.floats(-1e4, 1e4),
    lam_d=st.floats(0.1, 3.0),
    lam_u=st.floats(0.1, 3.0),
    beta=st.floats(0.01, 2.0),
)
def test_kto_loss_lies_in_zero_lambda(rho, kl, lam_d, lam_u, beta):
    rho = jnp.asarray(rho, jnp.float32)
    desirable = np.arange(SIZE) % 2 == 0
    up = losses.UnpairedLogps(
        logps=rho, ref_logps=jnp.zeros(SIZE), label=jnp.asarray(desirable),
        kl_logps=jnp.full(SIZE, kl, jnp.float32), ref_kl_logps=jnp.zeros(SIZE),
    )
    hparams = dict(beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    out = np.asarray(losses.get("kto")(up, **hparams).losses)
    lam = np.where(desirable, lam_d, lam_u)
    assert (out >= 0).all() and (out <= lam * (1 + 1e-6)).all()


def test_kto_no_gradient_through_the_kl_baseline():
    spec, up = _unpaired("kto", SIZE, seed=5)
    up = synthetic.replace(up, kl_logps=up.kl_logps + 30.0)
    np.testing.assert_array_equal(_grad_wrt(spec, up, "kl_logps"), 0.0)


def test_kto_reduces_to_the_value_at_the_reference_point():
    """At rho = z0 every desirable loss is lambda_D / 2 and every undesirable one lambda_U / 2."""
    spec = losses.get("kto")
    up = losses.UnpairedLogps(
        logps=jnp.full(SIZE, -7.0), ref_logps=jnp.full(SIZE, -10.0), label=jnp.arange(SIZE) % 2,
        kl_logps=jnp.full(SIZE, -17.0), ref_kl_logps=jnp.full(SIZE, -20.0),
    )
    out = spec(up, desirable_weight=2.0, undesirable_weight=0.5)
    np.testing.assert_allclose(out.losses, np.where(np.arange(SIZE) % 2, 1.0, 0.25), rtol=1e-6)


# ------------------------------------------------------------------------------ BCO


def _bco_batches(sizes, seed):
    batches = []
    for i, size in enumerate(sizes):
        _, up = _unpaired("bco", size, seed=seed + i)
        # Padding examples in some batches: they must not move the running mean.
        weight = (np.random.default_rng(seed + i).uniform(size=size) > 0.3).astype(np.float32)
        batches.append(synthetic.replace(up, weight=jnp.asarray(weight)))
    return batches


def test_bco_running_mean_is_exact_over_steps_under_jit():
    spec = losses.get("bco")
    step = jax.jit(lambda up, state: spec(up, state, beta=0.2))
    batches = _bco_batches([SIZE] * 6, seed=10)
    expected, (mean, count) = ref_bco_steps(batches, beta=0.2)
    state = spec.init_state(beta=0.2)
    for up, want in zip(batches, expected):
        out = step(up, state)
        real = _real(up)
        np.testing.assert_allclose(np.asarray(out.losses)[real], want[real], **TOL)
        state = out.state
    np.testing.assert_allclose(state["mean"], mean, **TOL)
    assert float(state["count"]) == count


def test_bco_running_mean_over_changing_batch_sizes():
    spec = losses.get("bco")
    batches = _bco_batches([7, 64, 1, 7], seed=20)
    expected, (mean, count) = ref_bco_steps(batches)
    state = spec.init_state(**spec.hparam_defaults)
    for up, want in zip(batches, expected):
        out = spec(up, state)
        real = _real(up)
        np.testing.assert_allclose(np.asarray(out.losses)[real], want[real], **TOL)
        np.testing.assert_allclose(out.metrics["bco/delta"], np.full(len(want), out.state["mean"]))
        state = out.state
    np.testing.assert_allclose(state["mean"], mean, **TOL)
    assert float(state["count"]) == count


def test_bco_padding_rows_never_reach_the_state():
    spec, up = _unpaired("bco", 64, seed=30)
    pad = np.arange(64) >= SIZE
    padded = synthetic.replace(
        up, logps=jnp.where(pad, jnp.nan, up.logps), weight=jnp.asarray(~pad, jnp.float32)
    )
    trimmed = jax.tree_util.tree_map(lambda x: x[:SIZE], up)
    state = _state(0.5, 3.0)
    out_padded, out_trimmed = spec(padded, state), spec(trimmed, state)
    np.testing.assert_allclose(out_padded.state["mean"], out_trimmed.state["mean"], rtol=1e-6)
    assert float(out_padded.state["count"]) == 3.0 + SIZE
    np.testing.assert_allclose(out_padded.losses[:SIZE], out_trimmed.losses, rtol=1e-6)


def test_bco_all_padding_batch_leaves_state_unchanged():
    spec, up = _unpaired("bco", SIZE, seed=31)
    out = spec(synthetic.replace(up, weight=jnp.zeros(SIZE)), _state(0.25, 9.0))
    assert float(out.state["mean"]) == 0.25 and float(out.state["count"]) == 9.0
    first = spec(synthetic.replace(up, weight=jnp.zeros(SIZE)), spec.init_state(beta=0.1))
    assert float(first.state["mean"]) == 0.0 and float(first.state["count"]) == 0.0


def test_bco_gradient_does_not_flow_through_delta():
    """d loss / d logps is exactly the BCE gradient with delta held fixed."""
    spec, up = _unpaired("bco", SIZE, seed=32)
    beta = 0.3
    out = spec(up, _state(0.1, 2.0), beta=beta)
    delta = float(out.state["mean"])
    z = beta * (as64(up.logps) - as64(up.ref_logps)) - delta
    expected = np.where(_labels(up), -beta * sigmoid(-z), beta * sigmoid(z))
    np.testing.assert_allclose(_grad_wrt(spec, up, "logps", _state(0.1, 2.0), beta=beta), expected, **TOL)


def test_bco_pair_equals_two_unpaired_bco_terms_with_the_same_delta():
    """One pair = a desirable chosen and an undesirable rejected seen in the same batch."""
    pair_spec, bco_spec = losses.get("bco_pair"), losses.get("bco")
    lp = synthetic.make_inputs(pair_spec, batch=SIZE, seed=40)
    up = losses.UnpairedLogps(
        logps=jnp.concatenate([lp.chosen, lp.rejected]),
        ref_logps=jnp.concatenate([lp.ref_chosen, lp.ref_rejected]),
        label=jnp.concatenate([jnp.ones(SIZE, bool), jnp.zeros(SIZE, bool)]),
    )
    state = _state(-0.4, 6.0)
    paired, unpaired = pair_spec(lp, state, beta=0.2), bco_spec(up, state, beta=0.2)
    np.testing.assert_allclose(paired.losses, unpaired.losses[:SIZE] + unpaired.losses[SIZE:], rtol=1e-6)
    np.testing.assert_allclose(paired.state["mean"], unpaired.state["mean"], rtol=1e-6)
    assert float(paired.state["count"]) == float(unpaired.state["count"])


def test_bco_pair_running_mean_over_steps_under_jit():
    spec = losses.get("bco_pair")
    step = jax.jit(lambda lp, state: spec(lp, state))
    batches = [synthetic.make_inputs(spec, batch=SIZE, seed=50 + i) for i in range(5)]
    expected, (mean, count) = ref_bco_pair_steps(batches)
    state = spec.init_state(**spec.hparam_defaults)
    for lp, want in zip(batches, expected):
        out = step(lp, state)
        np.testing.assert_allclose(out.losses, want, **TOL)
        state = out.state
    np.testing.assert_allclose(state["mean"], mean, **TOL)
    assert float(state["count"]) == count


@settings(max_examples=30, deadline=None)
@given(
    chosen=st.lists(st.floats(-200.0, 0.0), min_size=SIZE, max_size=SIZE),
    rejected=st.lists(st.floats(-200.0, 0.0), min_size=SIZE, max_size=SIZE),
    mean=st.floats(-20.0, 20.0),
    count=st.floats(0.0, 1e6),
    beta=st.floats(0.01, 1.0),
)
def test_bco_pair_upper_bounds_dpo(chosen, rejected, mean, count, beta):
    """The paper's Theorem 1 with reward shift: the BCE terms bound the DPO loss for any delta."""
    lp = losses.PairLogps(
        chosen=jnp.asarray(chosen), rejected=jnp.asarray(rejected),
        ref_chosen=jnp.full(SIZE, -100.0), ref_rejected=jnp.full(SIZE, -100.0),
    )
    bco = np.asarray(losses.get("bco_pair")(lp, _state(mean, count), beta=beta).losses)
    dpo = np.asarray(losses.get("dpo")(lp, beta=beta).losses)
    assert (bco >= dpo * (1 - 1e-6) - 1e-5).all()  # float32 rounding only


def test_bco_pair_reports_trl_reward_metrics():
    spec = losses.get("bco_pair")
    lp = synthetic.make_inputs(spec, batch=SIZE, seed=60)
    out = spec(lp, spec.init_state(beta=0.1))
    rewards = 0.1 * (as64(lp.chosen) - as64(lp.ref_chosen))
    np.testing.assert_allclose(out.metrics["rewards/chosen"], rewards, rtol=1e-5)
    assert {"rewards/margins", "rewards/accuracies", "logps/rejected", "bco/delta"} <= set(out.metrics)


# ------------------------------------------------------------------------------ NPO


def test_npo_tends_to_gradient_ascent_as_beta_vanishes():
    """Zhang et al. Prop. 1: L_NPO - (2/beta) log 2 -> log pi_theta - log pi_ref and its
    gradient -> that of L_GA = log pi_theta, i.e. d loss / d log pi_theta -> 1."""
    spec = losses.get("npo")
    rho = np.array([-3.0, -1.2, -0.5, 0.0, 0.7, 1.5, 2.0])
    up = losses.UnpairedLogps(
        logps=jnp.asarray(rho - 10.0, jnp.float32),
        ref_logps=jnp.full(SIZE, -10.0),
        label=jnp.zeros(SIZE, bool),
    )
    gaps = []
    for beta in (1e-1, 1e-2, 1e-3):
        grad = _grad_wrt(spec, up, "logps", beta=beta)
        gaps.append(np.abs(grad - 1.0).max())
        np.testing.assert_allclose(grad, 2 * sigmoid(beta * rho), rtol=1e-6)
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 2e-3
    shifted = np.asarray(spec(up, beta=1e-3).losses, np.float64) - 2e3 * np.log(2.0)
    np.testing.assert_allclose(shifted, rho, atol=5e-3)


def test_npo_ignores_retain_examples_by_default():
    spec, up = _unpaired("npo", SIZE, seed=70)
    out = spec(up)
    desirable = _labels(up)
    np.testing.assert_array_equal(np.asarray(out.losses)[desirable], 0.0)
    np.testing.assert_array_equal(_grad_wrt(spec, up, "logps")[desirable], 0.0)


def test_npo_retain_term_is_token_mean_nll_or_sequence_nll_without_length():
    spec, up = _unpaired("npo", SIZE, seed=71)
    desirable = _labels(up)
    with_len = np.asarray(spec(up, retain_weight=2.0).losses)
    token_mean_nll = -as64(up.logps) / as64(up.length)
    np.testing.assert_allclose(with_len[desirable], 2.0 * token_mean_nll[desirable], rtol=1e-6)
    without = np.asarray(spec(synthetic.replace(up, length=None), retain_weight=2.0).losses)
    np.testing.assert_allclose(without[desirable], (-2.0 * as64(up.logps))[desirable], rtol=1e-6)
    np.testing.assert_allclose(without[~desirable], with_len[~desirable], rtol=1e-6)


def test_npo_forget_loss_is_log2_scaled_at_the_reference():
    spec = losses.get("npo")
    at_ref = jnp.full(SIZE, -4.0)
    up = losses.UnpairedLogps(logps=at_ref, ref_logps=at_ref, label=jnp.zeros(SIZE, bool))
    np.testing.assert_allclose(spec(up, beta=0.5).losses, 4.0 * np.log(2.0), rtol=1e-6)


# --------------------------------------------------------------------- all of them


UNPAIRED = ("kto", "bco", "npo")


def _call(spec, inputs, **hparams):
    state = spec.init_state(**spec.hparam_defaults) if spec.stateful else None
    return spec(inputs, state, **hparams) if spec.stateful else spec(inputs, **hparams)


@pytest.mark.parametrize("name", UNPAIRED)
def test_gradient_signs_follow_labels(name):
    spec, up = _unpaired(name, SIZE, seed=80)
    hparams = {"retain_weight": 1.0} if name == "npo" else {}
    state = spec.init_state(**spec.hparam_defaults) if spec.stateful else None
    grad = _grad_wrt(spec, up, "logps", state, **hparams)
    desirable = _labels(up)
    assert (grad[desirable] <= 0).all() and (grad[~desirable] >= 0).all()
    assert (grad[desirable] < 0).any() and (grad[~desirable] > 0).any()


def test_bco_pair_gradient_signs():
    spec = losses.get("bco_pair")
    lp = synthetic.make_inputs(spec, batch=SIZE, seed=81)
    state = spec.init_state(beta=0.1)
    assert (_grad_wrt(spec, lp, "chosen", state) < 0).all()
    assert (_grad_wrt(spec, lp, "rejected", state) > 0).all()


@pytest.mark.parametrize("name", UNPAIRED)
def test_integer_labels_match_boolean_labels(name):
    spec, up = _unpaired(name, SIZE, seed=90)
    as_int = synthetic.replace(up, label=up.label.astype(jnp.int32))
    as_float = synthetic.replace(up, label=up.label.astype(jnp.float32))
    base = _call(spec, up).losses
    np.testing.assert_array_equal(_call(spec, as_int).losses, base)
    np.testing.assert_array_equal(_call(spec, as_float).losses, base)


@pytest.mark.parametrize("name", UNPAIRED)
def test_class_sums_give_trl_class_means(name):
    spec, up = _unpaired(name, SIZE, seed=91)
    out = _call(spec, up)
    beta = spec.hparam_defaults["beta"]
    rewards = beta * (as64(up.logps) - as64(up.ref_logps))
    desirable = _labels(up)
    m = {k: np.asarray(v, np.float64) for k, v in out.metrics.items()}
    np.testing.assert_allclose(
        m["rewards/chosen_sum"].sum() / m["count/chosen"].sum(), rewards[desirable].mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        m["logps/rejected_sum"].sum() / m["count/rejected"].sum(),
        as64(up.logps)[~desirable].mean(),
        rtol=1e-5,
    )


@pytest.mark.parametrize("name", ("kto", "bco", "bco_pair", "npo"))
def test_extreme_log_probs_stay_finite(name):
    spec = losses.get(name)
    inputs = synthetic.make_inputs(spec, batch=SIZE, seed=92)
    extremes = jnp.array([-1e4, -1e4, -1.0, -1e4, -0.5, -3.0, -1e4], jnp.float32)
    policy = "logps" if spec.inputs is losses.UnpairedLogps else "chosen"
    reference = "ref_logps" if policy == "logps" else "ref_chosen"
    inputs = synthetic.replace(inputs, **{policy: extremes, reference: extremes[::-1]})
    state = spec.init_state(**spec.hparam_defaults) if spec.stateful else None
    out = spec(inputs, state) if spec.stateful else spec(inputs)
    assert np.isfinite(np.asarray(out.losses)).all()
    assert np.isfinite(_grad_wrt(spec, inputs, policy, state)).all()
    for value in out.metrics.values():
        assert np.isfinite(np.asarray(value)).all()
