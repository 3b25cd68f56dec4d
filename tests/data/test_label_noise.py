"""The seeded label-flip injector: exact counts, determinism, and what a flip does."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefjax import losses
from prefjax.data import label_noise
from tests.losses.numpy_ref import as64, log_sigmoid

B, T = 12, 5


def _full_pair(batch=B, seed=0, rejected_tokens=T):
    """A PairLogps with every field set, chosen and rejected easy to tell apart."""
    rng = np.random.default_rng(seed)

    def col(*shape, low=-50.0, high=-1.0):
        return jnp.asarray(rng.uniform(low, high, shape), jnp.float32)

    return losses.PairLogps(
        chosen=col(batch), rejected=col(batch),
        ref_chosen=col(batch), ref_rejected=col(batch),
        chosen_len=jnp.asarray(rng.integers(1, 9, batch), jnp.float32),
        rejected_len=jnp.asarray(rng.integers(1, 9, batch), jnp.float32),
        chosen_token_logps=col(batch, T), rejected_token_logps=col(batch, rejected_tokens),
        chosen_token_kl=col(batch, T, low=0.0, high=1.0),
        rejected_token_kl=col(batch, rejected_tokens, low=0.0, high=1.0),
        chosen_mask=jnp.asarray(rng.integers(0, 2, (batch, T)), jnp.float32),
        rejected_mask=jnp.asarray(rng.integers(0, 2, (batch, rejected_tokens)), jnp.float32),
        score_chosen=col(batch, 3), score_rejected=col(batch, 3),
        margin=col(batch, low=0.0, high=2.0), gold=col(batch), gold_len=jnp.full(batch, 4.0),
        weight=jnp.ones(batch),
    )


@pytest.mark.parametrize("num_pairs", [0, 1, 7, 10, 64, 1000])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_choose_flips_flips_exactly_round_rate_n(num_pairs, rate):
    flips = label_noise.choose_flips(num_pairs, rate, seed=3)
    assert flips.dtype == bool and flips.shape == (num_pairs,)
    assert flips.sum() == int(np.floor(rate * num_pairs + 0.5))


def test_rounding_halves_go_up():
    assert label_noise.choose_flips(5, 0.5, seed=0).sum() == 3  # round(2.5) -> 3, not banker's 2
    assert label_noise.choose_flips(10, 0.25, seed=0).sum() == 3  # 2.5 -> 3


def test_rate_zero_and_one():
    assert not label_noise.choose_flips(50, 0.0, seed=1).any()
    assert label_noise.choose_flips(50, 1.0, seed=1).all()


def test_deterministic_by_seed_and_seeds_differ():
    a = label_noise.choose_flips(200, 0.3, seed=11)
    np.testing.assert_array_equal(a, label_noise.choose_flips(200, 0.3, seed=11))
    assert not np.array_equal(a, label_noise.choose_flips(200, 0.3, seed=12))


def test_lower_rate_flips_a_subset_for_the_same_seed():
    low = label_noise.choose_flips(300, 0.1, seed=5)
    high = label_noise.choose_flips(300, 0.4, seed=5)
    assert np.all(high[low])


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_choose_flips_rejects_bad_rates(rate):
    with pytest.raises(ValueError, match="rate"):
        label_noise.choose_flips(10, rate, seed=0)


def test_flip_swaps_every_paired_field_only_on_flipped_rows():
    lp = _full_pair()
    flips = label_noise.choose_flips(B, 0.5, seed=2)
    out = label_noise.flip_pairs(lp, flips)
    for chosen_name, rejected_name in label_noise.PAIRED_FIELDS:
        c, r = np.asarray(getattr(lp, chosen_name)), np.asarray(getattr(lp, rejected_name))
        np.testing.assert_array_equal(np.asarray(getattr(out, chosen_name))[flips], r[flips])
        np.testing.assert_array_equal(np.asarray(getattr(out, rejected_name))[flips], c[flips])
        np.testing.assert_array_equal(np.asarray(getattr(out, chosen_name))[~flips], c[~flips])
        np.testing.assert_array_equal(np.asarray(getattr(out, rejected_name))[~flips], r[~flips])
    for untouched in ("margin", "gold", "gold_len", "weight"):
        np.testing.assert_array_equal(getattr(out, untouched), getattr(lp, untouched))


def test_flipping_twice_is_identity():
    lp = _full_pair(seed=1)
    flips = label_noise.choose_flips(B, 0.4, seed=9)
    twice = label_noise.flip_pairs(label_noise.flip_pairs(lp, flips), flips)
    for f in dataclasses.fields(lp):
        np.testing.assert_array_equal(np.asarray(getattr(twice, f.name)), np.asarray(getattr(lp, f.name)))


def test_none_fields_stay_none_and_half_pairs_are_rejected():
    lp = losses.PairLogps(chosen=jnp.zeros(4), rejected=jnp.ones(4))
    out = label_noise.flip_pairs(lp, np.array([True, False, True, False]))
    assert out.ref_chosen is None and out.chosen_token_kl is None
    np.testing.assert_array_equal(out.chosen, [1, 0, 1, 0])
    broken = losses.PairLogps(chosen=jnp.zeros(4), rejected=jnp.ones(4), ref_chosen=jnp.zeros(4))
    with pytest.raises(ValueError, match="ref_rejected"):
        label_noise.flip_pairs(broken, np.ones(4, bool))
    with pytest.raises(ValueError, match="flip_mask"):
        label_noise.flip_pairs(lp, np.ones(3, bool))


def test_token_fields_of_different_widths_are_padded_and_keep_masked_sums():
    lp = _full_pair(rejected_tokens=T + 2)
    flips = label_noise.choose_flips(B, 0.5, seed=4)
    out = label_noise.flip_pairs(lp, flips)
    assert out.chosen_token_logps.shape == out.rejected_token_logps.shape == (B, T + 2)

    def masked_sum(x, m):
        return np.where(np.asarray(m) > 0, np.asarray(x), 0.0).sum(-1)

    before_w = masked_sum(lp.chosen_token_kl, lp.chosen_mask)
    before_l = masked_sum(lp.rejected_token_kl, lp.rejected_mask)
    after_w = masked_sum(out.chosen_token_kl, out.chosen_mask)
    np.testing.assert_allclose(after_w, np.where(flips, before_l, before_w), rtol=1e-6)


def test_flip_pairs_under_jit_with_traced_mask():
    lp = _full_pair(seed=2)
    flips = label_noise.choose_flips(B, 0.5, seed=6)
    eager = label_noise.flip_pairs(lp, flips)
    jitted = jax.jit(label_noise.flip_pairs)(lp, jnp.asarray(flips))
    for f in dataclasses.fields(lp):
        np.testing.assert_array_equal(np.asarray(getattr(jitted, f.name)), np.asarray(getattr(eager, f.name)))


def test_inject_label_noise_reports_the_flipped_rows():
    lp = _full_pair(seed=3)
    noisy, flips = label_noise.inject_label_noise(lp, rate=0.25, seed=8)
    np.testing.assert_array_equal(flips, label_noise.choose_flips(B, 0.25, seed=8))
    assert flips.sum() == 3
    np.testing.assert_array_equal(np.asarray(noisy.chosen) != np.asarray(lp.chosen), flips)


def test_dpo_on_flipped_rows_is_dpo_at_minus_h():
    lp = _full_pair(batch=40, seed=4)
    noisy, flips = label_noise.inject_label_noise(lp, rate=0.3, seed=1)
    beta = 0.1
    h = (as64(lp.chosen) - as64(lp.ref_chosen)) - (as64(lp.rejected) - as64(lp.ref_rejected))
    expected = -log_sigmoid(np.where(flips, -beta * h, beta * h))
    np.testing.assert_allclose(losses.get("dpo")(noisy, beta=beta).losses, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(num_pairs=st.integers(0, 500), rate=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_count_and_determinism_for_any_arguments(num_pairs, rate, seed):
    flips = label_noise.choose_flips(num_pairs, rate, seed)
    assert flips.sum() == label_noise.num_flips(num_pairs, rate)
    assert abs(flips.sum() - rate * num_pairs) <= 0.5
    np.testing.assert_array_equal(flips, label_noise.choose_flips(num_pairs, rate, seed))
