"""Chunked token log-probs and KL against the naive full-logits computation.

Values are checked against an independent float64 numpy log-softmax (and KL) written from the
definitions; gradients against jax.grad of the naive jax computation that materialises the
[B, T, V] logits. Tiling is exercised with chunk sizes that divide T, that do not (a ragged,
shifted last tile), that exceed T, and with vocabulary tiles that do and do not divide V.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefjax import logprobs

B, T, D, V = 2, 23, 16, 97
SOFTCAP = 2.5


def _inputs(seed=0, batch=B, length=T, dim=D, vocab=V, scale=1.0):
    k = jax.random.split(jax.random.key(seed), 6)
    h = scale * jax.random.normal(k[0], (batch, length, dim), jnp.float32)
    w = jax.random.normal(k[1], (dim, vocab), jnp.float32) / np.sqrt(dim)
    h_ref = h + 0.5 * jax.random.normal(k[2], h.shape, jnp.float32)
    w_ref = w + 0.2 * jax.random.normal(k[3], w.shape, jnp.float32) / np.sqrt(dim)
    labels = jax.random.randint(k[4], (batch, length), 0, vocab)
    weights = jax.random.normal(k[5], (batch, length), jnp.float32)
    return h, w, h_ref, w_ref, labels, weights


# ---------------------------------------------------------------------------------------------
# Independent references


def np_log_softmax(h, w, softcap=None):
    """float64 log softmax(c tanh(h W / c)) over the vocabulary."""
    z = np.einsum("btd,dv->btv", np.asarray(h, np.float64), np.asarray(w, np.float64))
    if softcap:
        z = softcap * np.tanh(z / softcap)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_token_logps(h, w, labels, softcap=None):
    return np.take_along_axis(np_log_softmax(h, w, softcap), np.asarray(labels)[..., None], -1)[..., 0]


def np_kl(h, w, h_ref, w_ref, softcap=None):
    """KL(p_ref || p) = sum_v p_ref(v) (log p_ref(v) - log p(v)), float64."""
    logp, logp_ref = np_log_softmax(h, w, softcap), np_log_softmax(h_ref, w_ref, softcap)
    return np.sum(np.exp(logp_ref) * (logp_ref - logp), -1)


def naive_logp_all(h, w, softcap=None):
    z = jnp.einsum("btd,dv->btv", h, w)
    if softcap:
        z = softcap * jnp.tanh(z / softcap)
    return jax.nn.log_softmax(z, axis=-1)


def naive_token_logps(h, w, labels, softcap=None):
    return jnp.take_along_axis(naive_logp_all(h, w, softcap), labels[..., None], -1)[..., 0]


def naive_kl(h, w, h_ref, w_ref, softcap=None):
    logp = naive_logp_all(h, w, softcap)
    logp_ref = jax.lax.stop_gradient(naive_logp_all(h_ref, w_ref, softcap))
    return jnp.sum(jnp.exp(logp_ref) * (logp_ref - logp), -1)


def _assert_close(actual, expected, rtol, atol, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol, err_msg=what)


# ---------------------------------------------------------------------------------------------
# token_logps

# (chunk, vocab chunk, soft-cap): larger than the array, exactly the array, ragged (a shifted last
# tile), dividing, single positions; each with and without the soft-cap somewhere.
TILINGS = [(128, None, None), (23, 97, SOFTCAP), (5, None, None), (5, None, SOFTCAP), (8, 30, None),
           (7, 13, None), (7, 13, SOFTCAP), (1, 96, None)]


@pytest.mark.parametrize("chunk,vocab_chunk,softcap", TILINGS)
def test_token_logps_values_and_gradients_match_naive(chunk, vocab_chunk, softcap):
    h, w, _, _, labels, weights = _inputs()

    def chunked(h, w):
        return jnp.sum(weights * logprobs.token_logps(h, w, labels, chunk_size=chunk,
                                                      vocab_chunk_size=vocab_chunk, logit_softcap=softcap))

    def naive(h, w):
        return jnp.sum(weights * naive_token_logps(h, w, labels, softcap))

    out = jax.jit(lambda h, w: logprobs.token_logps(
        h, w, labels, chunk_size=chunk, vocab_chunk_size=vocab_chunk, logit_softcap=softcap))(h, w)
    assert out.shape == (B, T) and out.dtype == jnp.float32
    _assert_close(out, np_token_logps(h, w, labels, softcap), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(chunked, argnums=(0, 1)))(h, w)
    expected = jax.jit(jax.grad(naive, argnums=(0, 1)))(h, w)
    for got, want, name in zip(grads, expected, ("hidden", "unembed")):
        assert got.dtype == want.dtype
        _assert_close(got, want, rtol=1e-4, atol=1e-5, what=name)


def test_vocab_tiling_equals_whole_vocabulary():
    h, w, _, _, labels, weights = _inputs(seed=1, scale=3.0)

    def f(vocab_chunk):
        def obj(h, w):
            lp = logprobs.token_logps(h, w, labels, chunk_size=6, vocab_chunk_size=vocab_chunk)
            return jnp.sum(weights * lp)
        return jax.jit(jax.value_and_grad(obj, argnums=(0, 1)))(h, w)

    whole = f(None)
    for vocab_chunk in (10, 32, 97):
        tiled = f(vocab_chunk)
        for a, b in zip(jax.tree.leaves(tiled), jax.tree.leaves(whole)):
            _assert_close(a, b, rtol=1e-5, atol=1e-5, what=f"vocab_chunk={vocab_chunk}")


@settings(max_examples=15)
@given(length=st.integers(1, 12), chunk=st.integers(1, 14), vocab=st.integers(2, 40),
       vocab_chunk=st.one_of(st.none(), st.integers(1, 45)))
def test_any_tiling_gives_the_exact_log_softmax(length, chunk, vocab, vocab_chunk):
    """Shifted ragged tiles count every position and vocabulary column exactly once."""
    rng = np.random.default_rng(length * 100 + vocab)
    h = rng.normal(size=(1, length, 4)).astype(np.float32)
    w = rng.normal(size=(4, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, size=(1, length))
    out = jax.jit(lambda h, w, l: logprobs.token_logps(
        h, w, l, chunk_size=chunk, vocab_chunk_size=vocab_chunk))(h, w, labels)
    _assert_close(out, np_token_logps(h, w, labels), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_within_tolerance():
    """bf16 matmul operands (8-bit mantissa), float32 accumulation: logits off by ~1e-2 relative."""
    h, w, _, _, labels, weights = _inputs(seed=2)
    out = logprobs.token_logps(h, w, labels, chunk_size=8, compute_dtype=jnp.bfloat16)
    assert out.dtype == jnp.float32
    _assert_close(out, np_token_logps(h, w, labels), rtol=0, atol=5e-2)
    g = jax.grad(lambda h, w: jnp.sum(weights * logprobs.token_logps(
        h, w, labels, chunk_size=8, compute_dtype=jnp.bfloat16)), argnums=(0, 1))(h, w)
    g_ref = jax.grad(lambda h, w: jnp.sum(weights * naive_token_logps(h, w, labels)), argnums=(0, 1))(h, w)
    for got, want in zip(g, g_ref):
        _assert_close(got, want, rtol=0, atol=3e-2 * float(jnp.max(jnp.abs(want))))


def test_bfloat16_inputs_get_bfloat16_gradients():
    h, w, _, _, labels, _ = _inputs(seed=3)
    h, w = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    gh, gw = jax.grad(lambda h, w: jnp.sum(logprobs.token_logps(h, w, labels, chunk_size=5)), (0, 1))(h, w)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(gh))) and bool(jnp.all(jnp.isfinite(gw)))


def test_masked_positions_are_zero_and_garbage_never_leaks():
    h, w, _, _, labels, weights = _inputs(seed=4)
    mask = jnp.arange(T)[None, :] < jnp.array([[15], [9]])
    garbage = jnp.array([1e30, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
    bad = jnp.resize(garbage, h.shape)
    h_bad = jnp.where(mask[..., None], h, bad)
    labels_bad = jnp.where(mask, labels, -100)  # the Hugging Face ignore index

    def obj(h, w):
        lp = logprobs.token_logps(h, w, labels_bad, mask_BxT=mask, chunk_size=4, vocab_chunk_size=40)
        return jnp.sum(weights * lp), lp

    (value, lp), (gh, gw) = jax.value_and_grad(obj, argnums=(0, 1), has_aux=True)(h_bad, w)
    assert bool(jnp.all(jnp.where(mask, True, lp == 0.0)))
    assert bool(jnp.all(jnp.isfinite(gh))) and bool(jnp.all(jnp.isfinite(gw)))
    assert bool(jnp.all(jnp.where(mask[..., None], True, gh == 0.0)))
    (value_clean, _), (gh_c, gw_c) = jax.value_and_grad(obj, argnums=(0, 1), has_aux=True)(h, w)
    _assert_close(value, value_clean, rtol=1e-6, atol=1e-6)
    _assert_close(gw, gw_c, rtol=1e-6, atol=1e-7)
    _assert_close(gh, gh_c, rtol=1e-6, atol=1e-7)


def test_unmasked_garbage_with_zero_cotangent_does_not_leak_into_gradients():
    """Without a mask, sequence_logps' where gives padding a zero cotangent; the backward drops it."""
    h, w, _, _, labels, _ = _inputs(seed=5)
    mask = jnp.arange(T)[None, :] < 12
    h_bad = jnp.where(mask[..., None], h, jnp.inf)

    def obj(h, w):
        total, _ = logprobs.sequence_logps(logprobs.token_logps(h, w, labels, chunk_size=5), mask)
        return jnp.sum(total)

    gh, gw = jax.grad(obj, argnums=(0, 1))(h_bad, w)
    gh_c, gw_c = jax.grad(obj, argnums=(0, 1))(h, w)
    assert bool(jnp.all(jnp.isfinite(gw))) and bool(jnp.all(jnp.isfinite(gh)))
    _assert_close(gw, gw_c, rtol=1e-6, atol=1e-7)


def test_vmap_and_jit():
    h, w, _, _, labels, _ = _inputs(seed=6)
    hs, labs = jnp.stack([h, h[::-1]]), jnp.stack([labels, labels[::-1]])
    f = jax.jit(jax.vmap(lambda h, l: logprobs.token_logps(h, w, l, chunk_size=6, vocab_chunk_size=50)))
    out = f(hs, labs)
    for i in range(2):
        _assert_close(out[i], np_token_logps(hs[i], w, labs[i]), rtol=1e-5, atol=1e-5)
    grad_fn = jax.grad(lambda h, l: jnp.sum(logprobs.token_logps(h, w, l, chunk_size=6)))
    g = jax.jit(jax.vmap(grad_fn))(hs, labs)
    g_ref = jax.vmap(jax.grad(lambda h, l: jnp.sum(naive_token_logps(h, w, l))))(hs, labs)
    _assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_shape_errors_are_reported():
    h, w, _, _, labels, _ = _inputs()
    with pytest.raises(ValueError, match="unembed"):
        logprobs.token_logps(h, w.T, labels)
    with pytest.raises(ValueError, match="labels"):
        logprobs.token_logps(h, w, labels[:, :-1])
    with pytest.raises(ValueError, match="positive"):
        logprobs.token_logps(h, w, labels, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# token_logps_and_kl / token_kl


@pytest.mark.parametrize("softcap", [None, SOFTCAP])
@pytest.mark.parametrize("chunk,vocab_chunk", [(128, None), (5, None), (7, 13)])
def test_logps_and_kl_values_and_policy_gradients_match_naive(chunk, vocab_chunk, softcap):
    h, w, h_ref, w_ref, labels, weights = _inputs(seed=7)
    mask = jnp.arange(T)[None, :] < jnp.array([[T], [17]])
    kwargs = dict(chunk_size=chunk, vocab_chunk_size=vocab_chunk, logit_softcap=softcap)

    out = jax.jit(lambda *a: logprobs.token_logps_and_kl(*a, **kwargs))(h, w, h_ref, w_ref, labels, mask)
    m = np.asarray(mask)
    _assert_close(out.policy_logps, np.where(m, np_token_logps(h, w, labels, softcap), 0), 1e-5, 1e-5)
    _assert_close(out.ref_logps, np.where(m, np_token_logps(h_ref, w_ref, labels, softcap), 0), 1e-5, 1e-5)
    _assert_close(out.kl, np.where(m, np_kl(h, w, h_ref, w_ref, softcap), 0), 1e-4, 2e-6)

    def chunked(h, w, h_ref, w_ref):
        o = logprobs.token_logps_and_kl(h, w, h_ref, w_ref, labels, mask, **kwargs)
        return jnp.sum(weights * o.kl + 0.3 * o.policy_logps - weights**2 * o.ref_logps)

    def naive(h, w):
        lp = naive_token_logps(h, w, labels, softcap)
        kl = naive_kl(h, w, h_ref, w_ref, softcap)
        return jnp.sum(jnp.where(mask, weights * kl + 0.3 * lp, 0.0))

    grads = jax.jit(jax.grad(chunked, argnums=(0, 1, 2, 3)))(h, w, h_ref, w_ref)
    expected = jax.jit(jax.grad(naive, argnums=(0, 1)))(h, w)
    _assert_close(grads[0], expected[0], rtol=1e-4, atol=1e-5, what="policy hidden")
    _assert_close(grads[1], expected[1], rtol=1e-4, atol=1e-5, what="policy unembed")
    assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3])), "reference got a gradient"


def test_kl_is_nonnegative_and_zero_for_identical_models():
    h, w, h_ref, w_ref, labels, _ = _inputs(seed=8, scale=4.0)
    kl = logprobs.token_kl(h, w, h_ref, w_ref, chunk_size=6, vocab_chunk_size=20, logit_softcap=SOFTCAP)
    assert bool(jnp.all(kl >= 0.0)) and float(jnp.min(kl)) > 0.0
    same = logprobs.token_logps_and_kl(h, w, h, w, labels, chunk_size=6, vocab_chunk_size=20)
    np.testing.assert_allclose(np.asarray(same.kl), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(same.policy_logps), np.asarray(same.ref_logps), atol=1e-6)
    # The KL's gradient at its minimum is 0 (up to rounding).
    g = jax.grad(lambda h: jnp.sum(logprobs.token_kl(h, w, h, w, chunk_size=6)))(h)
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-5)


def test_kl_masked_positions_are_zero_with_nan_free_gradients():
    h, w, h_ref, w_ref, labels, weights = _inputs(seed=9)
    mask = jnp.arange(T)[None, :] < jnp.array([[5], [20]])
    h_bad = jnp.where(mask[..., None], h, 1e30)
    h_ref_bad = jnp.where(mask[..., None], h_ref, jnp.nan)

    def obj(h, w):
        o = logprobs.token_logps_and_kl(h, w, h_ref_bad, w_ref, labels, mask, chunk_size=4,
                                        vocab_chunk_size=50)
        return jnp.sum(weights * (o.kl + o.policy_logps)), o

    (_, o), (gh, gw) = jax.value_and_grad(obj, argnums=(0, 1), has_aux=True)(h_bad, w)
    for field in o:
        assert bool(jnp.all(jnp.where(mask, jnp.isfinite(field), field == 0.0)))
    assert bool(jnp.all(jnp.isfinite(gh))) and bool(jnp.all(jnp.isfinite(gw)))
    assert bool(jnp.all(jnp.where(mask[..., None], True, gh == 0.0)))


def test_kl_under_vmap():
    h, w, h_ref, w_ref, _, _ = _inputs(seed=10)
    f = jax.jit(jax.vmap(lambda h, hr: logprobs.token_kl(h, w, hr, w_ref, chunk_size=5), in_axes=(0, 0)))
    out = f(jnp.stack([h, h_ref]), jnp.stack([h_ref, h]))
    _assert_close(out[0], np_kl(h, w, h_ref, w_ref), rtol=1e-4, atol=2e-6)
    _assert_close(out[1], np_kl(h_ref, w, h, w_ref), rtol=1e-4, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# sequence_logps and shift_labels


def test_sequence_logps_is_a_where_based_masked_sum():
    values = jnp.array([[-1.0, -2.0, jnp.nan, -jnp.inf], [-0.5, jnp.inf, -1.5, -2.5]])
    mask = jnp.array([[1, 1, 0, 0], [1, 0, 1, 1]])
    total, count = logprobs.sequence_logps(values, mask)
    np.testing.assert_allclose(np.asarray(total), [-3.0, -4.5])
    np.testing.assert_allclose(np.asarray(count), [2.0, 3.0])
    assert total.dtype == count.dtype == jnp.float32
    g = jax.grad(lambda v: jnp.sum(logprobs.sequence_logps(v, mask)[0]))(values)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(mask, np.float32))


def test_shift_labels_convention():
    tokens = jnp.array([[5, 6, 7, 8, 9]])
    loss_mask = jnp.array([[0, 0, 1, 1, 1]])  # prompt 5 6, response 7 8 9
    labels, mask = logprobs.shift_labels(tokens, loss_mask)
    np.testing.assert_array_equal(np.asarray(labels), [[6, 7, 8, 9, 0]])
    np.testing.assert_array_equal(np.asarray(mask), [[False, True, True, True, False]])
    assert mask.dtype == jnp.bool_
    _, all_mask = logprobs.shift_labels(tokens)
    np.testing.assert_array_equal(np.asarray(all_mask), [[True, True, True, True, False]])


def test_shift_labels_scores_each_token_from_the_state_before_it():
    """With a toy 'model' whose hidden state at t is embed(tokens[t]), the response log-prob is
    sum over response tokens y_t of log p(y_t | previous token), the bigram table's entries."""
    vocab, dim = 11, 11
    table = jax.random.normal(jax.random.key(11), (vocab, vocab))  # table[prev] = logits of next
    tokens = jax.random.randint(jax.random.key(12), (2, 9), 0, vocab)
    loss_mask = jnp.arange(9)[None, :] >= jnp.array([[3], [5]])
    labels, mask = logprobs.shift_labels(tokens, loss_mask)
    hidden = jax.nn.one_hot(tokens, dim)
    total, count = jax.jit(lambda h, l, m: logprobs.sequence_logps(
        logprobs.token_logps(h, table, l, mask_BxT=m), m))(hidden, labels, mask)
    bigram = np.asarray(jax.nn.log_softmax(table, axis=-1), np.float64)
    tok = np.asarray(tokens)
    for b, first in enumerate((3, 5)):
        expected = sum(bigram[tok[b, t - 1], tok[b, t]] for t in range(first, 9))
        np.testing.assert_allclose(float(total[b]), expected, rtol=1e-5)
        assert float(count[b]) == 9 - first


# ---------------------------------------------------------------------------------------------
# Scored positions first: tiles past every row's last scored position are skipped


def test_scored_first_permutation_is_stable_and_inverted():
    mask = jnp.array([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], bool)
    order, inverse, packed = logprobs._scored_first(mask)
    np.testing.assert_array_equal(order[0], [1, 3, 4, 0, 2, 5])  # scored ones in order, then the rest
    np.testing.assert_array_equal(order[1], [0, 5, 1, 2, 3, 4])
    np.testing.assert_array_equal(order[2], np.arange(6))
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(order), np.asarray(inverse), 1),
                                  np.broadcast_to(np.arange(6), (3, 6)))
    np.testing.assert_array_equal(packed, [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0] * 6])


@pytest.mark.parametrize("mask_rows,expected", [([[0] * 10], 0), ([[1] + [0] * 9], 1), ([[0] * 4 + [1] + [0] * 5], 2),
                                                ([[0] * 9 + [1], [1] + [0] * 9], 3)])
def test_active_tiles_end_at_the_last_scored_position(mask_rows, expected):
    assert int(logprobs._active_tiles(jnp.array(mask_rows, bool), 4)) == expected


@pytest.mark.parametrize("chunk", [4, 5, 64])
def test_prompt_heavy_masks_match_naive_values_and_gradients(chunk):
    """Rows that score only a late stretch (a long prompt), one row scoring nothing, scattered masks."""
    h, w, h_ref, w_ref, labels, weights = _inputs(seed=11, batch=4)
    pos = np.arange(T)
    mask = jnp.asarray(np.stack([pos >= 15, np.zeros(T, bool), (pos % 3 == 0) & (pos > 2), pos >= 21]))
    m = np.asarray(mask)
    out = jax.jit(lambda h, w: logprobs.token_logps(h, w, labels, mask_BxT=mask, chunk_size=chunk))(h, w)
    _assert_close(out, np.where(m, np_token_logps(h, w, labels), 0), 1e-5, 1e-5)
    assert not np.any(np.asarray(out)[1])

    def chunked(h, w):
        o = logprobs.token_logps_and_kl(h, w, h_ref, w_ref, labels, mask, chunk_size=chunk)
        return jnp.sum(weights * o.policy_logps + 0.5 * o.kl)

    def naive(h, w):
        return jnp.sum(jnp.where(mask, weights * naive_token_logps(h, w, labels)
                                 + 0.5 * naive_kl(h, w, h_ref, w_ref), 0.0))

    grads = jax.jit(jax.grad(chunked, argnums=(0, 1)))(h, w)
    expected = jax.jit(jax.grad(naive, argnums=(0, 1)))(h, w)
    _assert_close(grads[0], expected[0], rtol=1e-4, atol=1e-5, what="hidden")
    _assert_close(grads[1], expected[1], rtol=1e-4, atol=1e-5, what="unembed")
    assert not np.any(np.asarray(grads[0])[~m]), "an unscored position got a gradient"


def test_nothing_scored_gives_zeros_and_zero_gradients():
    h, w, _, _, labels, _ = _inputs(seed=3)
    mask = jnp.zeros((B, T), bool)
    out = logprobs.token_logps(h, w, labels, mask_BxT=mask, chunk_size=5)
    assert not np.any(np.asarray(out))
    g = jax.grad(lambda h, w: logprobs.token_logps(h, w, labels, mask_BxT=mask, chunk_size=5).sum(),
                 argnums=(0, 1))(h, w)
    assert not np.any(np.asarray(g[0])) and not np.any(np.asarray(g[1]))


# ---------------------------------------------------------------------------------------------
# Tiles bounded in tokens per device; the backward's buffers


def test_tile_tokens_shrink_the_sequence_tile_by_the_rows_on_one_device():
    labels = jnp.zeros((16, 1024), jnp.int32)
    plan = lambda tokens: logprobs._plan(labels, 1000, 256, None, tokens, None, jnp.float32, None)  # noqa: E731
    assert plan(None).seq_chunk == 256
    assert plan(512).seq_chunk == 32  # 16 rows x 32 positions
    assert plan(10**6).seq_chunk == 256  # never above chunk_size
    assert plan(1).seq_chunk == logprobs._MIN_TILE_POSITIONS
    with pytest.raises(ValueError, match="tile_tokens=0"):
        plan(0)
    from prefjax import sharding
    with sharding.use_mesh(sharding.make_mesh({"data": 4, "fsdp": 2})):
        assert plan(512).seq_chunk == 256  # 2 rows per device: 512 // 2 caps nothing below 256
    with sharding.use_mesh(sharding.make_mesh({"tensor": 8})):
        assert plan(512).seq_chunk == 32  # rows are not split over the tensor axis


@pytest.mark.parametrize("tile_tokens", [4, 9, 40])
def test_tile_tokens_give_the_same_values_and_gradients(tile_tokens):
    h, w, h_ref, w_ref, labels, weights = _inputs(seed=5, batch=4, length=40)
    mask = jnp.asarray(np.arange(40)[None, :] >= np.array([[3], [20], [0], [33]]))

    def f(h, w, tokens):
        o = logprobs.token_logps_and_kl(h, w, h_ref, w_ref, labels, mask, chunk_size=16, tile_tokens=tokens)
        return jnp.sum(weights * o.policy_logps + 0.3 * o.kl), o

    (_, got), g_got = jax.jit(jax.value_and_grad(lambda h, w: f(h, w, tile_tokens), (0, 1), has_aux=True))(h, w)
    (_, want), g_want = jax.jit(jax.value_and_grad(lambda h, w: f(h, w, None), (0, 1), has_aux=True))(h, w)
    for a, b, name in zip((*got, *g_got), (*want, *g_want), ("logps", "ref_logps", "kl", "d_hidden", "d_unembed")):
        _assert_close(a, b, rtol=1e-5, atol=1e-6, what=name)
    _assert_close(got.policy_logps, np.where(mask, np_token_logps(h, w, labels), 0), 1e-5, 1e-5)


def test_scored_first_gradient_is_a_gather_not_a_scatter():
    # The transpose of the scored-first permutation is its inverse (a gather); autodiff of a
    # gather would scatter-add into a zero-filled [B, T, D] buffer.
    h, w, _, _, labels, _ = _inputs(seed=2, batch=3, length=64)
    mask = jnp.asarray(np.arange(64)[None, :] >= np.array([[40], [10], [50]]))
    grad = jax.jit(jax.grad(lambda h: logprobs.token_logps(h, w, labels, mask_BxT=mask, chunk_size=8).sum()))
    assert not re.search(r"\bscatter\(", grad.lower(h).compile().as_text())
    want = jax.grad(lambda h: jnp.sum(jnp.where(mask, naive_token_logps(h, w, labels), 0)))(h)
    _assert_close(grad(h), want, rtol=1e-4, atol=1e-6)

