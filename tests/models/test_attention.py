"""Attention implementations against a float64 numpy softmax written from the masking rules.

The blocked and flash paths (the CPU defaults) must equal plain softmax attention where the
mask already excludes keys later in the row, in values and gradients; the model must give
the same hidden states and gradients with them as with jax's "xla" implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models
from prefjax.models import attention


def _visible(positions, segments, window=None):
    """[B, T, T] bool from the module's rule, written as loops: same live segment, causal, in window,
    and not later in the row."""
    b, t = segments.shape
    out = np.zeros((b, t, t), bool)
    for r in range(b):
        for i in range(t):
            for j in range(i + 1):
                same = segments[r, j] == segments[r, i] and segments[r, j] != 0
                delta = positions[r, i] - positions[r, j]
                out[r, i, j] = same and delta >= 0 and (window is None or delta < window)
    return out


def _np_attention(q, k, v, visible, scale, softcap=None):
    """float64 softmax attention with GQA; fully masked rows are a uniform average (as in the module)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    logits = np.where(visible[:, None], logits, -1e30)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _rows():
    """A plain row, a right-padded row and a packed row (3 segments, restarting positions, padding)."""
    t = 13
    positions = np.array([np.arange(t), np.arange(t), [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 0]])
    segments = np.array([[1] * t, [1] * 9 + [0] * 4, [1] * 4 + [2] * 3 + [3] * 5 + [0]])
    return positions, segments


def _qkv(t=13, b=3, n=4, kv=2, h=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, t, kv, h)),
            jax.random.normal(keys[2], (b, t, kv, h)))


@pytest.mark.parametrize("impl", ["blocked", "flash"])
@pytest.mark.parametrize("block", [4, 5, 13, 64])
@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (None, 2.0)])
def test_tiled_attention_equals_softmax_attention(impl, block, window, softcap):
    positions, segments = _rows()
    q, k, v = _qkv()
    mask = attention.index_causal(attention.attention_mask(
        jnp.asarray(positions), jnp.asarray(segments), jnp.asarray(positions), jnp.asarray(segments), window))
    visible = _visible(positions, segments, window)
    np.testing.assert_array_equal(mask, visible)
    got = attention.dot_product_attention(q, k, v, mask, scale=0.3, logit_softcap=softcap, implementation=impl,
                                          block_size=block, causal_rows=True)
    live = segments != 0  # padding queries' outputs are ignored downstream
    want = _np_attention(q, k, v, visible, 0.3, softcap)
    np.testing.assert_allclose(np.asarray(got)[live], want[live], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,block,softcap", [("blocked", 4, None), ("flash", 4, None), ("flash", 5, 1.5),
                                                ("flash", 64, None)])
def test_tiled_gradients_equal_plain_attention(impl, block, softcap):
    positions, segments = _rows()
    q, k, v = _qkv(seed=1)
    mask = attention.index_causal(attention.attention_mask(
        jnp.asarray(positions), jnp.asarray(segments), jnp.asarray(positions), jnp.asarray(segments), None))
    live = jnp.asarray(segments != 0)[..., None, None]
    weights = jax.random.normal(jax.random.key(5), q.shape)

    def loss(attend, q, k, v):
        return jnp.sum(jnp.where(live, attend(q, k, v) * weights, 0.0))

    tiled = lambda q, k, v: attention.dot_product_attention(  # noqa: E731
        q, k, v, mask, scale=0.35, logit_softcap=softcap, implementation=impl, block_size=block, causal_rows=True)
    plain = lambda q, k, v: attention.einsum_attention(q, k, v, mask, scale=0.35, logit_softcap=softcap)  # noqa: E731
    got = jax.jit(jax.grad(lambda *a: loss(tiled, *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2)))(q, k, v)
    if softcap is None:  # and jax's own attention agrees with the einsum reference
        xla = lambda q, k, v: attention.dot_product_attention(  # noqa: E731
            q, k, v, mask, scale=0.35, logit_softcap=None, implementation="xla")
        np.testing.assert_allclose(jax.grad(lambda *a: loss(xla, *a))(q, k, v), want[0], rtol=1e-4, atol=1e-5)
    for g, w, name in zip(got, want, "qkv"):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_index_causal_drops_later_keys_even_when_positions_allow_them():
    # positions that count down would make later keys "causal" by position; the row order wins.
    positions = jnp.array([[3, 2, 1, 0]])
    segments = jnp.ones((1, 4), jnp.int32)
    by_position = attention.attention_mask(positions, segments, positions, segments, None)
    assert bool(by_position[0, 0, 3])
    assert not bool(attention.index_causal(by_position)[0, 0, 3])
    assert bool(attention.index_causal(by_position)[0, 3, 3])


def test_cpu_default_is_blocked_then_flash_and_explicit_choices_are_kept(monkeypatch):
    assert jax.default_backend() == "cpu"
    monkeypatch.delenv("PREFJAX_ATTENTION", raising=False)
    assert attention.resolve_implementation(None) == "blocked"
    assert attention.resolve_implementation(None, 512) == "blocked"
    assert attention.resolve_implementation(None, 1024) == "flash"
    assert attention.resolve_implementation("xla", 4096) == "xla"
    # $PREFJAX_ATTENTION replaces the default only: an explicit choice still wins
    monkeypatch.setenv("PREFJAX_ATTENTION", "xla")
    assert attention.resolve_implementation(None, 1024, fused_supported=lambda: True) == "xla"
    assert attention.resolve_implementation("blocked", 1024) == "blocked"


@pytest.mark.parametrize("name,impl,block", [("llama2-tiny", "blocked", 4), ("mistral-tiny", "blocked", 8),
                                            ("gemma2-tiny", "blocked", 8), ("llama2-tiny", "flash", 8),
                                            ("gemma2-tiny", "flash", 16)])
def test_model_with_tiled_attention_equals_xla_values_and_gradients(name, impl, block):
    """Packed and padded rows through the whole model (windows: mistral; soft-caps: gemma2)."""
    cfg = models.get_preset(name, attention_impl=impl, attention_block_size=block)
    graphdef, params = models.init_params(cfg, seed=0)
    # soft-capped attention never goes to jax's kernels: there the reference is one single block
    xla_graphdef = models.abstract(cfg.replace(attention_impl="xla", attention_block_size=10**6))[0]
    t = 24
    tokens = jax.random.randint(jax.random.key(2), (2, t), 1, cfg.vocab_size)
    positions = jnp.array([list(range(t)), list(range(10)) + list(range(11)) + [0, 0, 0]])
    segments = jnp.array([[1] * t, [1] * 10 + [2] * 11 + [0] * 3])
    live = segments != 0
    weights = jax.random.normal(jax.random.key(3), (2, t, cfg.hidden_size))

    def loss(gd, p):
        hidden = models.apply(gd, p, tokens, positions_BxT=positions, segments_BxT=segments)[0]
        return jnp.sum(jnp.where(live[..., None], hidden * weights, 0.0)), hidden

    (_, got), g_got = jax.jit(jax.value_and_grad(lambda p: loss(graphdef, p), has_aux=True))(params)
    (_, want), g_want = jax.jit(jax.value_and_grad(lambda p: loss(xla_graphdef, p), has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(got)[np.asarray(live)], np.asarray(want)[np.asarray(live)],
                               rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="attention_block_size"):
        models.get_preset("llama2-tiny", attention_block_size=0)
