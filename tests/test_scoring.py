"""Scoring (prefjax.scoring.score): per-response sums equal a direct float64 computation, packed
rows equal unpacked ones, reward heads read each response's last token, the reference's token KL,
and KTO's mismatched rows."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from prefjax import models, scoring
from tests.batch_helpers import CFG, pack_pairs
from tests.batch_helpers import random_batch as _batch
from tests.batch_helpers import tiny_model as _model
from tests.batch_helpers import tiny_scorer as _scorer


def _log_softmax64(graphdef, params, batch):
    hidden, _ = models.apply(graphdef, params, batch.tokens, positions_BxT=batch.positions,
                             segments_BxT=batch.segments)
    logits = np.asarray(hidden @ models.unembedding(graphdef, params), np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top, hidden


def test_per_response_sums_match_a_direct_computation():
    graphdef, params = _model()
    batch = _batch("pair", 2, b=3)
    got = jax.jit(lambda: scoring.score(_scorer(), params, batch))()
    logp, _ = _log_softmax64(graphdef, params, batch)
    tokens, mask = np.asarray(batch.tokens), np.asarray(batch.loss_mask)
    for row in range(6):
        want = sum(logp[row, t - 1, tokens[row, t]] for t in range(1, tokens.shape[1]) if mask[row, t] > 0)
        k, b = divmod(row, 3)
        np.testing.assert_allclose(float(got.logps[b, k]), want, rtol=1e-5)
        assert float(got.lengths[b, k]) == mask[row].sum()




def test_packed_rows_score_like_unpacked_ones():
    _, params = _model()
    batch = _batch("pair", 2, b=4)
    a, b = jax.jit(lambda: (scoring.score(_scorer(), params, batch), scoring.score(_scorer(), params,
                                                                                       pack_pairs(batch))))()
    np.testing.assert_allclose(np.asarray(b.logps), np.asarray(a.logps), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(b.lengths), np.asarray(a.lengths))
    assert b.token_logps is None and a.token_logps.shape == (2, 4, 16)  # per-token arrays: unpacked rows only
    with pytest.raises(ValueError, match="'token_kl' needs unpacked rows"):
        scoring.score(_scorer(), params, pack_pairs(batch), what=("token_kl",), reference=params)


def test_reward_head_reads_each_responses_last_scored_token():
    graphdef, params = _model()
    batch = _batch("pair", 2, b=3)
    head = jax.random.normal(jax.random.key(3), (CFG.hidden_size, 3))
    got = jax.jit(lambda: scoring.score(_scorer(), params, batch, what=("rewards",), reward_head=head))()
    assert got.rewards.shape == (3, 2, 3) and got.logps is None  # rewards alone: no unembedding
    with_logps = jax.jit(lambda: scoring.score(_scorer(), params, batch, what=("logps", "rewards"),
                                               reward_head=head))()
    np.testing.assert_array_equal(np.asarray(with_logps.rewards), np.asarray(got.rewards))
    np.testing.assert_array_equal(np.asarray(with_logps.lengths), np.asarray(got.lengths))
    _, hidden = _log_softmax64(graphdef, params, batch)
    mask = np.asarray(batch.loss_mask) > 0
    tokens = np.asarray(batch.tokens)
    for row in range(6):
        last = int(np.flatnonzero(mask[row])[-1])  # the response's final token reads the whole response
        assert not mask[row, last + 1:].any() and (tokens[row, last + 1:] == 0).all()  # only pads after it
        k, b = divmod(row, 3)
        want = np.asarray(hidden, np.float64)[row, last] @ np.asarray(head, np.float64)
        np.testing.assert_allclose(np.asarray(got.rewards[b, k]), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["packed", "shared_prefix"])
def test_packed_and_prefix_shared_rows_read_the_same_rewards(layout):
    from prefjax.data import prefix_sharing

    _, params = _model()
    batch = _batch("pair", 2, b=4)
    other = pack_pairs(batch) if layout == "packed" else prefix_sharing.share_prefixes(batch, multiple=1)
    assert other.layout == layout and other.tokens.shape[0] < batch.tokens.shape[0]
    head = jax.random.normal(jax.random.key(5), (CFG.hidden_size, 2))
    a, b = jax.jit(lambda: (scoring.score(_scorer(), params, batch, what=("rewards",), reward_head=head),
                            scoring.score(_scorer(), params, other, what=("rewards",), reward_head=head)))()
    np.testing.assert_allclose(np.asarray(b.rewards), np.asarray(a.rewards), rtol=1e-4, atol=1e-5)
    positions = np.asarray(scoring.last_token_positions(other))
    t = other.tokens.shape[1]
    ids, resp = np.asarray(other.example_id), np.asarray(other.response_id)
    for example in range(4):
        for k in range(2):
            row, pos = divmod(int(positions[example, k]), t)
            assert ids[row, pos] == example and resp[row, pos] == k and other.loss_mask[row, pos] > 0


def test_token_kl_is_zero_against_itself_and_positive_against_another_model():
    _, params = _model()
    _, other = _model(seed=1)
    batch = _batch("pair", 2, b=2)
    same = jax.jit(lambda: scoring.score(_scorer(), params, batch, what=("token_kl",), reference=params))()
    np.testing.assert_allclose(np.asarray(same.token_kl), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(same.ref_logps), np.asarray(same.logps), rtol=1e-6)
    diff = jax.jit(lambda: scoring.score(_scorer(), params, batch, what=("token_kl",), reference=other))()
    live = np.asarray(diff.token_mask)
    assert (np.asarray(diff.token_kl)[live] > 0).all() and not np.asarray(diff.token_kl)[~live].any()
    ref_alone = jax.jit(lambda: scoring.score(_scorer(), other, batch))()
    np.testing.assert_allclose(np.asarray(diff.ref_logps), np.asarray(ref_alone.logps), rtol=1e-5)


def test_unknown_or_incomplete_requests_are_named():
    _, params = _model()
    batch = _batch("pair", 2, b=2)
    with pytest.raises(ValueError, match="unknown quantities \\['hidden'\\]"):
        scoring.score(_scorer(), params, batch, what=("hidden",))
    with pytest.raises(ValueError, match="needs the reference"):
        scoring.score(_scorer(), params, batch, what=("token_kl",))
    with pytest.raises(ValueError, match="needs a reward head"):
        scoring.score(_scorer(), params, batch, what=("rewards",))
