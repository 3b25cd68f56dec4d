"""The `sft` loss against the maximum-likelihood objective written in numpy, and its properties:
undesirable examples are left out, the trainer's weighted mean is the batch's token-mean NLL
("tokens") or the mean of each response's per-token NLL ("sequence"), gradients push every
kept log-prob up, extreme log-probs stay finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from tests.losses.numpy_ref import ATOL, as64

SPEC = losses.get("sft")


def _inputs(batch, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    length = rng.integers(1, 40, size=batch).astype(np.float32)
    logps = -length * rng.uniform(0.1, 3.0, size=batch)  # log-prob sums of responses of those lengths
    label = rng.uniform(size=batch) < 0.6
    label[0] = True
    return losses.UnpairedLogps(logps=jnp.asarray(logps, dtype), label=jnp.asarray(label),
                                length=jnp.asarray(length, dtype))


def ref_sft_tokens(up):
    """sum over desirable examples of -log pi(y|x), over their summed lengths (the batch's token mean)."""
    keep = np.asarray(up.label, bool)
    return float(np.sum(-as64(up.logps)[keep]) / np.sum(as64(up.length)[keep]))


def ref_sft_sequence(up, weight):
    """Mean over desirable examples (weighted) of -log pi(y|x) / |y|."""
    keep = np.asarray(up.label, bool) * as64(weight)
    nll = -as64(up.logps) / np.maximum(as64(up.length), 1.0)
    return float(np.sum(keep * nll) / np.sum(keep))


@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reduced_loss_is_the_token_mean_nll_of_the_kept_responses(batch, dtype):
    up = _inputs(batch, seed=batch, dtype=dtype)
    total, count = losses.weighted_sum_and_count(SPEC(up), jnp.ones(batch))
    np.testing.assert_allclose(float(total / count), ref_sft_tokens(up), rtol=2e-5, atol=ATOL)
    # padding examples (weight 0) change neither the sum nor the mean length
    padded = losses.UnpairedLogps(logps=jnp.concatenate([up.logps, jnp.full(3, -1e4, up.logps.dtype)]),
                                  label=jnp.concatenate([up.label, jnp.ones(3, bool)]),
                                  length=jnp.concatenate([up.length, jnp.full(3, 99.0, up.length.dtype)]),
                                  weight=jnp.concatenate([jnp.ones(batch), jnp.zeros(3)]))
    total, count = losses.weighted_sum_and_count(SPEC(padded), padded.weight)
    np.testing.assert_allclose(float(total / count), ref_sft_tokens(up), rtol=2e-5, atol=ATOL)


@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sequence_normalisation_is_the_mean_per_token_nll_of_the_kept_responses(batch, dtype):
    up = _inputs(batch, seed=batch, dtype=dtype)
    weight = jnp.asarray(np.random.default_rng(7).uniform(0.5, 2.0, size=batch), jnp.float32)
    out = SPEC(up, normalize="sequence")
    total, count = losses.weighted_sum_and_count(out, weight)
    np.testing.assert_allclose(float(total / count), ref_sft_sequence(up, weight), rtol=2e-5, atol=ATOL)
    nll = -as64(up.logps) / np.maximum(as64(up.length), 1.0)
    np.testing.assert_allclose(np.asarray(out.metrics["nll"]), nll, rtol=2e-5, atol=ATOL)
    with pytest.raises(ValueError, match="normalize='words'"):
        SPEC(up, normalize="words")


def test_undesirable_examples_are_left_out():
    up = _inputs(8, seed=3)
    out = SPEC(up)
    np.testing.assert_array_equal(np.asarray(out.keep), np.asarray(up.label, np.float32))
    # An undesirable example's log-prob does not move the reduced loss at all.
    grad = jax.grad(lambda lp: losses.weighted_sum_and_count(SPEC(up.__class__(
        logps=lp, label=up.label, length=up.length)))[0])(up.logps)
    assert np.all(np.asarray(grad)[~np.asarray(up.label)] == 0.0)


def test_gradient_raises_every_kept_log_prob():
    up = _inputs(6, seed=4)
    label, length = np.asarray(up.label), np.asarray(up.length)

    def grad(normalize):
        def reduced(lp):
            total, count = losses.weighted_sum_and_count(SPEC(losses.UnpairedLogps(
                logps=lp, label=up.label, length=up.length), normalize=normalize))
            return total / count
        return np.asarray(jax.grad(reduced)(up.logps))

    # tokens: d(sum NLL / sum length) / d log pi = -1 / (total kept tokens) for every kept response
    np.testing.assert_allclose(grad("tokens"), np.where(label, -1.0 / length[label].sum(), 0.0), rtol=1e-5)
    np.testing.assert_allclose(grad("sequence"), np.where(label, -1.0 / (length * label.sum()), 0.0), rtol=1e-5)


def test_a_perfect_model_has_zero_loss_and_extremes_stay_finite():
    length = jnp.asarray([3.0, 1.0, 50.0])
    label = jnp.asarray([True, True, False])
    perfect = SPEC(losses.UnpairedLogps(logps=jnp.zeros(3), label=label, length=length))
    np.testing.assert_array_equal(np.asarray(perfect.losses), 0.0)
    extreme = SPEC(losses.UnpairedLogps(logps=jnp.full(3, -1e4), label=label, length=length))
    assert np.isfinite(np.asarray(extreme.losses)).all()
    np.testing.assert_allclose(np.asarray(extreme.losses), [1e4 / 2, 1e4 / 2, 0.0], rtol=1e-6)  # mean length 2
    per_response = SPEC(losses.UnpairedLogps(logps=jnp.full(3, -1e4), label=label, length=length),
                        normalize="sequence")
    np.testing.assert_allclose(np.asarray(per_response.losses), [1e4 / 3, 1e4, 0.0], rtol=1e-6)


def test_needs_lengths():
    with pytest.raises(losses.LossInputError, match="'length'"):
        SPEC(losses.UnpairedLogps(logps=jnp.zeros(2), label=jnp.ones(2, bool)))
