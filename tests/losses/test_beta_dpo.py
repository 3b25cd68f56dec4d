"""beta-DPO against a numpy re-implementation of its paper/authors' update, and its properties.

Reference (Wu et al. 2024, beta-DPO; authors' trainer junkangwu/beta-DPO), per step:
  M_i = h_i;  M_0 <- m M_0 + (1-m) mean(M);  sigma <- m sigma + (1-m) std(M) (ddof=1);
  draw max(1, floor(rho n)) examples without replacement, p_i ~ exp(-(M_i - M_0)^2 / 2 sigma^2);
  beta_b = max(beta (1 + alpha (mean_selected M - M_0)), 1e-3);  loss_i = -log sigma(beta_b h_i).

The numpy step below is float64 and independent of prefjax. Only the random draw is
shared: the reference takes the step's Gumbel noise from the state's key exactly as
documented (split, then gumbel of the second key) and draws the top-k of
log p_i + Gumbel_i; the draw's distribution is checked separately against the
exact successive-sampling probabilities.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.data import synthetic_logps as synthetic
from prefjax.losses.beta_dpo import BetaDPOState
from tests.losses.numpy_ref import as64, log_sigmoid

SPEC = losses.get("beta_dpo")
BATCHES = (1, 7, 64)
DTYPES = (jnp.float32, jnp.bfloat16)
DEFAULTS = dict(beta=0.1, alpha=0.6, rho=0.8, momentum=0.9)


@functools.partial(jax.jit, static_argnames=("beta", "alpha", "rho", "momentum"))
def step(lp, state, beta=0.1, alpha=0.6, rho=0.8, momentum=0.9):
    """The registered loss under jit (compiled once per shape): keeps the tests fast."""
    return SPEC(lp, state, beta=beta, alpha=alpha, rho=rho, momentum=momentum)


def ref_step(lp, state, beta=0.1, alpha=0.6, rho=0.8, momentum=0.9):
    """One beta-DPO step in float64: (losses, keep, beta_batch, (M_0, sigma), next_key)."""
    h = (as64(lp.chosen) - as64(lp.ref_chosen)) - (as64(lp.rejected) - as64(lp.ref_rejected))
    valid = np.ones(h.shape, bool) if lp.weight is None else np.asarray(lp.weight) > 0
    n = int(valid.sum())
    mean, std = float(state.gap_mean), float(state.gap_std)
    if n > 0:
        hv = h[valid]
        mean = momentum * mean + (1 - momentum) * hv.mean()
        std = momentum * std + (1 - momentum) * (hv.std(ddof=1) if n > 1 else 0.0)
    next_key, step_key = jax.random.split(state.key)
    gumbel = as64(jax.random.gumbel(step_key, h.shape, jnp.float32))
    log_p = -0.5 * ((h - mean) / max(std, 1e-6)) ** 2
    k = max(1, int(n * rho)) if n > 0 else 0
    order = [i for i in np.argsort(-(log_p + gumbel)) if valid[i]]
    keep = np.zeros(h.shape)
    keep[order[:k]] = 1.0
    selected_mean = h[keep > 0].mean() if k > 0 else 0.0
    beta_b = max(beta * (1 + alpha * (selected_mean - mean)), 1e-3)
    return -log_sigmoid(beta_b * h), keep, beta_b, (mean, std), next_key


def _inputs(batch, seed, dtype=jnp.float32, weight=None):
    lp = synthetic.make_inputs(SPEC, batch=batch, seed=seed, dtype=dtype)
    return lp if weight is None else synthetic.replace(lp, weight=jnp.asarray(weight, jnp.float32))


def _state(mean=0.0, std=0.0, seed=0):
    return BetaDPOState(jnp.float32(mean), jnp.float32(std), jax.random.PRNGKey(seed))


def _check_step(out, ref, state_tol=1e-5):
    losses_ref, keep_ref, beta_ref, (mean_ref, std_ref), key_ref = ref
    np.testing.assert_array_equal(np.asarray(out.keep), keep_ref)
    np.testing.assert_allclose(out.state.gap_mean, mean_ref, rtol=state_tol, atol=1e-5)
    np.testing.assert_allclose(out.state.gap_std, std_ref, rtol=state_tol, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.state.key), np.asarray(key_ref))
    np.testing.assert_allclose(out.metrics["beta_dpo/beta"], beta_ref, rtol=1e-5)
    np.testing.assert_allclose(out.losses, losses_ref, rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_one_step_matches_reference(batch, dtype):
    lp = _inputs(batch, seed=batch, dtype=dtype)
    st = _state(seed=batch)
    out = step(lp, st)
    assert out.losses.dtype == jnp.float32 and out.losses.shape == (batch,)
    _check_step(out, ref_step(lp, st, **DEFAULTS))


@pytest.mark.parametrize("batch", (7, 64))
def test_one_step_matches_reference_with_custom_hparams_and_state(batch):
    hparams = {"alpha": 1.5, "rho": 0.5, "momentum": 0.5, "beta": 0.2}
    lp = _inputs(batch, seed=batch + 1)
    st = _state(3.0, 20.0, seed=batch)
    _check_step(step(lp, st, **hparams), ref_step(lp, st, **hparams))


def test_three_step_trajectory_matches_reference():
    state = SPEC.init_state(**SPEC.hparam_defaults)
    ref_state = state
    for i in range(3):
        lp = _inputs(12, seed=10 + i, weight=(np.arange(12) < 10).astype(np.float32))
        out = step(lp, state)
        ref = ref_step(lp, ref_state, **DEFAULTS)
        _check_step(out, ref)
        state = out.state
        mean, std = ref[3]
        ref_state = BetaDPOState(jnp.float32(mean), jnp.float32(std), ref[4])


def test_no_filtering_and_no_adaptation_is_dpo():
    lp = _inputs(12, seed=1, weight=np.ones(12, np.float32))
    out = step(lp, _state(5.0, 2.0), alpha=0.0, rho=1.0)
    np.testing.assert_array_equal(out.keep, np.ones(12))
    np.testing.assert_allclose(out.losses, losses.get("dpo")(lp).losses, rtol=1e-6)
    np.testing.assert_allclose(out.metrics["beta_dpo/beta"], 0.1, rtol=1e-6)


@pytest.mark.parametrize("rho", [0.8, 0.7, 0.5, 0.1])
def test_selected_count_is_the_kept_fraction_of_real_examples(rho):
    batch = 12
    lp = _inputs(batch, seed=8, weight=np.ones(batch, np.float32))
    for n_pad in (0, 1, 2, 5, 11):
        weight = (np.arange(batch) >= n_pad).astype(np.float32)
        out = step(synthetic.replace(lp, weight=jnp.asarray(weight)), _state(seed=n_pad), rho=rho)
        assert float(out.keep.sum()) == max(1, int((batch - n_pad) * rho))
        assert np.all(np.asarray(out.keep)[weight == 0] == 0)


def test_padding_never_selected_and_excluded_from_statistics():
    batch = 12
    weight = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], np.float32)
    lp = _inputs(batch, seed=2, weight=weight)
    # Make the padding examples extreme: they would dominate the statistics if counted.
    lp = synthetic.replace(lp, chosen=jnp.where(weight == 0, 1e4, lp.chosen))
    real = jax.tree_util.tree_map(lambda x: x[weight > 0], lp)
    for seed in range(5):
        out = step(lp, _state(1.0, 3.0, seed=seed))
        assert np.all(np.asarray(out.keep)[weight == 0] == 0)
        sub = step(real, _state(1.0, 3.0, seed=seed))
        np.testing.assert_allclose(out.state.gap_mean, sub.state.gap_mean, rtol=1e-6)
        np.testing.assert_allclose(out.state.gap_std, sub.state.gap_std, rtol=1e-6)
        assert np.all(np.isfinite(out.losses))


def test_all_padding_batch_leaves_statistics_unchanged():
    lp = _inputs(4, seed=3, weight=np.zeros(4, np.float32))
    st = _state(2.0, 5.0)
    out = step(lp, st)
    assert float(out.state.gap_mean) == 2.0 and float(out.state.gap_std) == 5.0
    assert float(out.keep.sum()) == 0.0
    assert np.all(np.isfinite(out.losses)) and np.all(np.isfinite(out.metrics["beta_dpo/beta"]))


def _inclusion_probabilities(p, k):
    """Exact P(i drawn) for k successive draws without replacement with weights p (enumeration)."""
    p = np.asarray(p, np.float64) / np.sum(p)
    incl = np.zeros(len(p))
    for seq in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        incl[list(seq)] += prob
    return incl


def test_selection_distribution_is_gaussian_weighted_sampling_without_replacement():
    """Inclusion frequencies over many keys match successive sampling with p ~ N(M_i; M_0, sigma)."""
    h = np.array([0.0, 0.5, 1.5, 3.0, -2.5])
    zeros = jnp.zeros(5)
    lp = losses.PairLogps(chosen=jnp.asarray(h, jnp.float32), rejected=zeros,
                          ref_chosen=zeros, ref_rejected=zeros)
    # momentum 0: M_0 and sigma are this batch's mean and (ddof=1) std.
    mean, std = h.mean(), h.std(ddof=1)
    p = np.exp(-0.5 * ((h - mean) / std) ** 2)
    keys = jax.random.split(jax.random.PRNGKey(42), 4000)
    draw = jax.jit(jax.vmap(lambda key: SPEC(lp, BetaDPOState(jnp.float32(0), jnp.float32(0), key),
                                             rho=0.4, momentum=0.0).keep))
    keep = draw(keys)
    assert np.all(np.asarray(keep.sum(axis=1)) == 2)
    np.testing.assert_allclose(np.asarray(keep.mean(axis=0)), _inclusion_probabilities(p, 2), atol=0.03)


def test_outliers_are_filtered_and_beta_grows_with_the_selected_gap():
    """An outlier far from M_0 is (almost) never kept; a batch of larger gaps gets a larger beta."""
    rng = np.random.default_rng(4)
    h = np.concatenate([rng.normal(0.0, 1.0, 11), [200.0]])
    zeros = jnp.zeros(12)
    lp = losses.PairLogps(chosen=jnp.asarray(h, jnp.float32), rejected=zeros,
                          ref_chosen=zeros, ref_rejected=zeros, weight=jnp.ones(12))
    st = _state(0.0, 1.0)
    out = step(lp, st, momentum=0.99)
    assert float(out.keep[-1]) == 0.0
    shifted = synthetic.replace(lp, chosen=lp.chosen + 2.0)
    beta_shifted = float(step(shifted, st, momentum=0.99).metrics["beta_dpo/beta"][0])
    assert beta_shifted > float(out.metrics["beta_dpo/beta"][0])


def test_beta_is_clamped_at_1e_minus_3():
    zeros = jnp.zeros(4)
    lp = losses.PairLogps(chosen=jnp.full(4, -50.0), rejected=zeros, ref_chosen=zeros, ref_rejected=zeros)
    out = step(lp, _state(-50.0, 10.0), momentum=0.5, rho=1.0, alpha=5.0)  # M_0 = -50 = gap mean: beta = 0.1
    np.testing.assert_allclose(out.metrics["beta_dpo/beta"], 0.1, rtol=1e-6)
    out = step(lp, _state(0.0, 10.0), momentum=0.5, rho=1.0, alpha=5.0)  # 0.1 (1 + 5 (-50 + 25)) < 0
    np.testing.assert_allclose(out.metrics["beta_dpo/beta"], 1e-3, rtol=1e-6)


def test_jit_with_state_in_and_out_matches_eager():
    jitted_step = jax.jit(lambda lp, st: SPEC(lp, st))
    st_eager = st_jit = SPEC.init_state(**SPEC.hparam_defaults)
    for i in range(3):
        lp = _inputs(12, seed=20 + i, weight=np.ones(12, np.float32))
        eager, jitted = SPEC(lp, st_eager), jitted_step(lp, st_jit)
        np.testing.assert_allclose(jitted.losses, eager.losses, rtol=1e-5)  # XLA fusion reorders roundings
        np.testing.assert_array_equal(jitted.keep, eager.keep)
        for a, b in zip(jitted.state, eager.state):
            np.testing.assert_allclose(a, b, rtol=1e-5)
        st_eager, st_jit = eager.state, jitted.state
    assert not np.array_equal(np.asarray(st_jit.key), np.asarray(SPEC.init_state(**SPEC.hparam_defaults).key))


def test_init_state_is_seeded_and_deterministic():
    a = SPEC.init_state(**SPEC.hparam_defaults)
    b = SPEC.init_state(**{**SPEC.hparam_defaults, "seed": 0})
    c = SPEC.init_state(**{**SPEC.hparam_defaults, "seed": 1})
    np.testing.assert_array_equal(a.key, b.key)
    assert not np.array_equal(np.asarray(a.key), np.asarray(c.key))
    assert float(a.gap_mean) == 0.0 and float(a.gap_std) == 0.0
    lp = _inputs(12, seed=5, weight=np.ones(12, np.float32))
    np.testing.assert_array_equal(step(lp, a).keep, step(lp, b).keep)


def test_finite_loss_and_grad_at_extreme_log_probs_and_gradient_sign():
    ref = jnp.zeros(6)
    chosen = jnp.array([-1e4, 0.0, -1e4, -5.0, 0.0, -1e4])
    rejected = jnp.array([0.0, -1e4, -1e4, -7.0, 0.0, -5.0])
    st = SPEC.init_state(**SPEC.hparam_defaults)

    def total(c, r):
        out = SPEC(losses.PairLogps(chosen=c, rejected=r, ref_chosen=ref, ref_rejected=ref), st)
        return jnp.sum(out.losses * out.keep) / jnp.maximum(out.keep.sum(), 1.0)

    value, (g_w, g_l) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(chosen, rejected)
    assert np.isfinite(value) and np.all(np.isfinite(g_w)) and np.all(np.isfinite(g_l))
    assert np.all(np.asarray(g_w) <= 0) and np.all(np.asarray(g_l) >= 0)


def test_metrics_and_reduction():
    lp = _inputs(12, seed=6, weight=np.ones(12, np.float32))
    out = step(lp, _state())
    for key in ("beta_dpo/beta", "beta_dpo/gap_mean", "beta_dpo/selected", "rewards/margins"):
        assert out.metrics[key].shape == (12,)
    np.testing.assert_array_equal(out.metrics["beta_dpo/selected"], out.keep)
    total, count = losses.weighted_sum_and_count(out, lp.weight)
    assert float(count) == 9.0
    np.testing.assert_allclose(total, np.sum(np.asarray(out.losses) * np.asarray(out.keep)), rtol=1e-6)


def test_invalid_hyperparameters_raise():
    lp = _inputs(4, seed=7)
    with pytest.raises(ValueError, match="rho"):
        SPEC(lp, _state(), rho=0.0)
    with pytest.raises(ValueError, match="momentum"):
        SPEC(lp, _state(), momentum=1.0)
    with pytest.raises(losses.LossInputError, match="stateful"):
        SPEC(lp)
