"""The C++ fused CPU attention kernel (prefjax.models.cpu.fused_attention) against independent references.

Forward values are checked against softmax attention written in numpy from its
definition; gradients against jax.grad of prefjax's einsum attention (a separate
code path). Shapes cover several 64-token tiles with a ragged last tile, GQA
group sizes 1/2/4, packed rows whose segments cross tile borders, padding rows,
sliding windows, extreme logits, a batch-sharded mesh, vmap, and the dispatcher's
choices and errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models, sharding
from prefjax.models import attention
from prefjax.models.cpu import fused_attention

pytestmark = pytest.mark.skipif(not fused_attention.available(),
                                reason=f"fused CPU kernel unavailable: {fused_attention.unavailable_reason()}")


def _numpy_attention(q, k, v, visible, scale):
    """softmax(q k^T scale, masked) v per head; GQA by repeating kv heads; [B, T, N, H]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    logits = np.where(visible[:, None], logits, -np.inf)
    logits -= np.maximum(logits.max(-1, keepdims=True), -1e30)  # rows with no visible key stay -inf
    p = np.exp(logits)
    p /= np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _layout(t: int, b: int, seed: int, window=None):
    """Row 0 plain, row 1 right-padded, row 2+ packed with segments of random lengths crossing tiles."""
    rng = np.random.default_rng(seed)
    positions = np.tile(np.arange(t), (b, 1))
    segments = np.ones((b, t), np.int32)
    if b > 1:
        segments[1, t - t // 3:] = 0
    for row in range(2, b):
        start, seg = 0, 1
        while start < t - 2:
            length = int(rng.integers(1, max(2, t // 2)))
            segments[row, start:start + length] = seg
            positions[row, start:start + length] = np.arange(min(length, t - start))
            start, seg = start + length, seg + 1
        segments[row, start:] = 0
    mask = attention.index_causal(attention.attention_mask(
        jnp.asarray(positions), jnp.asarray(segments), jnp.asarray(positions), jnp.asarray(segments), window))
    return mask, segments != 0


def _token_layout(t: int, b: int, seed: int, window=None, shared=False):
    """Random per-token layout (as `_layout`, optionally with prefix-shared branches) and its dense mask."""
    rng = np.random.default_rng(seed)
    positions = np.tile(np.arange(t), (b, 1)).astype(np.int32)
    segments = np.ones((b, t), np.int32)
    branches = np.zeros((b, t), np.int32)
    segments[0, t - t // 4:] = 0
    for row in range(1, b):
        start, seg = 0, 1
        while start < t - 2:
            length = int(rng.integers(2, max(3, t // 2)))
            end = min(t, start + length)
            segments[row, start:end] = seg
            positions[row, start:end] = np.arange(end - start)
            if shared and end - start >= 6:  # prompt, then two responses continuing its positions
                p = (end - start) // 3
                r0 = (end - start - p) // 2
                branches[row, start + p:start + p + r0] = 1
                branches[row, start + p + r0:end] = 2
                positions[row, start + p + r0:end] = p + np.arange(end - start - p - r0)
            start, seg = end, seg + 1
        segments[row, start:] = 0
    layout = fused_attention.TokenLayout(jnp.asarray(positions), jnp.asarray(segments), jnp.asarray(branches), window)
    mask = attention.index_causal(attention.attention_mask(layout.positions, layout.segments, layout.positions,
                                                           layout.segments, window, layout.branches))
    return layout, mask


@pytest.mark.parametrize("t,window,shared", [(100, None, False), (150, 40, False), (140, None, True),
                                             (200, 50, True)])
def test_token_layout_equals_its_dense_mask(t, window, shared):
    # The layout handlers build each tile's mask in the kernel; values and gradients must equal
    # the dense-mask handlers' (the same tiles, so the same arithmetic: equal to rounding).
    layout, mask = _token_layout(t, 4, seed=t, window=window, shared=shared)
    q, k, v = _qkv(4, t, 4, 2, 32, seed=t)
    weights = jax.random.normal(jax.random.key(1), q.shape)

    def run(m):
        f = lambda q, k, v: fused_attention.fused_attention(q, k, v, m, scale=0.2)  # noqa: E731
        return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(q, k, v)

    (out_l, grads_l), (out_d, grads_d) = run(layout), run(mask)
    np.testing.assert_allclose(out_l, out_d, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_l, grads_d):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(out_l).max()) > 0.1 and not np.allclose(np.asarray(grads_l[1]), 0)


def test_token_layout_keeps_the_t_by_t_mask_out_of_the_program():
    t, b = 1024, 2
    layout, _ = _token_layout(t, b, seed=9)
    q, k, v = _qkv(b, t, 1, 1, 16, seed=9)

    def temp_bytes(make_mask):
        def loss(q, k, v, positions, segments, branches):
            parts = fused_attention.TokenLayout(positions, segments, branches)
            m = make_mask(parts)
            return jnp.sum(fused_attention.fused_attention(q, k, v, m, scale=0.25) ** 2)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        compiled = grad.lower(q, k, v, layout.positions, layout.segments, layout.branches).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    dense = temp_bytes(lambda parts: attention.index_causal(attention.attention_mask(
        parts.positions, parts.segments, parts.positions, parts.segments, None, parts.branches)))
    compact = temp_bytes(lambda parts: parts)
    assert dense >= b * t * t and compact < b * t * t // 4, (dense, compact)


def test_token_layout_on_a_batch_sharded_mesh():
    layout, _ = _token_layout(70, 8, seed=3, window=30, shared=True)
    q, k, v = _qkv(8, 70, 4, 2, 16, seed=3)
    grad = jax.grad(lambda q, k, v: jnp.sum(fused_attention.fused_attention(q, k, v, layout, scale=0.25) ** 2),
                    argnums=(0, 1, 2))
    single = grad(q, k, v)
    with sharding.use_mesh(sharding.make_mesh({"data": 4, "fsdp": 2})):
        sharded = jax.jit(grad)(q, k, v)
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _qkv(b, t, n, kv, h, seed, spread=1.0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (spread * jax.random.normal(keys[0], (b, t, n, h)), spread * jax.random.normal(keys[1], (b, t, kv, h)),
            jax.random.normal(keys[2], (b, t, kv, h)))


@pytest.mark.parametrize("t,n,kv,h,window", [(13, 4, 2, 16, None), (64, 2, 2, 32, None), (130, 4, 1, 16, None),
                                             (200, 4, 2, 64, None), (150, 2, 1, 16, 40)])
def test_forward_equals_numpy_softmax_attention(t, n, kv, h, window):
    mask, live = _layout(t, 4, seed=t, window=window)
    q, k, v = _qkv(4, t, n, kv, h, seed=t)
    got = np.asarray(fused_attention.fused_attention(q, k, v, mask, scale=h ** -0.5))
    want = _numpy_attention(q, k, v, np.asarray(mask), h ** -0.5)
    np.testing.assert_allclose(got[live], want[live], rtol=2e-5, atol=2e-5)
    # padding queries (no visible key) give exactly zero rather than NaN
    np.testing.assert_array_equal(got[~live], 0.0)


def test_extreme_logits_stay_finite_and_exact():
    mask, live = _layout(100, 3, seed=1)
    q, k, v = _qkv(3, 100, 2, 1, 16, seed=2, spread=6.0)  # logits in the hundreds
    got = np.asarray(fused_attention.fused_attention(q, k, v, mask, scale=1.0))
    assert np.isfinite(got).all()
    want = _numpy_attention(q, k, v, np.asarray(mask), 1.0)
    np.testing.assert_allclose(got[live], want[live], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t,n,kv,h", [(13, 4, 2, 16), (150, 4, 1, 32), (130, 2, 2, 16)])
def test_gradients_equal_einsum_attention(t, n, kv, h):
    mask, live = _layout(t, 4, seed=t + 1)
    q, k, v = _qkv(4, t, n, kv, h, seed=t + 1)
    weights = jax.random.normal(jax.random.key(9), q.shape)
    live_q = jnp.asarray(live)[..., None, None]

    def loss(attend, q, k, v):
        return jnp.sum(jnp.where(live_q, attend(q, k, v) * weights, 0.0))

    fused = lambda q, k, v: fused_attention.fused_attention(q, k, v, mask, scale=0.3)  # noqa: E731
    plain = lambda q, k, v: attention.einsum_attention(q, k, v, mask, scale=0.3, logit_softcap=None)  # noqa: E731
    got = jax.jit(jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2)))(q, k, v)
    for g, w, name in zip(got, want, "qkv"):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5, err_msg=name)
    assert float(jnp.abs(got[0]).max()) > 0.1  # the check compares real gradients, not zeros
    # a padding query's gradient is zero: its output never reached the loss
    np.testing.assert_array_equal(np.asarray(got[0])[~live], 0.0)


def test_batch_sharded_mesh_matches_single_device():
    mask, _ = _layout(70, 8, seed=3)
    q, k, v = _qkv(8, 70, 4, 2, 16, seed=3)
    grad = jax.grad(lambda q, k, v: jnp.sum(fused_attention.fused_attention(q, k, v, mask, scale=0.25) ** 2),
                    argnums=(0, 1, 2))
    single = grad(q, k, v)
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    with sharding.use_mesh(mesh):
        sharded = jax.jit(grad)(q, k, v)
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_vmap_over_an_extra_axis():
    mask, _ = _layout(20, 2, seed=4)
    q, k, v = _qkv(2, 20, 2, 1, 16, seed=4)
    stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]
    got = jax.vmap(lambda q, k, v: fused_attention.fused_attention(q, k, v, mask, scale=0.5))(*stacked)
    for i in range(2):
        np.testing.assert_allclose(got[i], fused_attention.fused_attention(*(x[i] for x in stacked), mask, scale=0.5),
                                   rtol=1e-6)


def test_cpu_default_uses_the_kernel_for_float32_and_falls_back_otherwise(monkeypatch):
    mask, _ = _layout(16, 2, seed=5)
    q, k, v = _qkv(2, 16, 2, 1, 16, seed=5)
    calls = []
    real = fused_attention.fused_attention
    monkeypatch.setattr(fused_attention, "fused_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    attention.dot_product_attention(q, k, v, mask, scale=0.25, logit_softcap=None, causal_rows=True)
    assert calls == [1]
    # bfloat16, soft-capping, a KV-cache forward and an unsupported head_dim take the JAX paths
    attention.dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask,
                                    scale=0.25, logit_softcap=None, causal_rows=True)
    attention.dot_product_attention(q, k, v, mask, scale=0.25, logit_softcap=3.0, causal_rows=True)
    attention.dot_product_attention(q, k, v, mask, scale=0.25, logit_softcap=None, causal_rows=False)
    q8, k8, v8 = _qkv(2, 16, 2, 1, 8, seed=5)
    attention.dot_product_attention(q8, k8, v8, mask, scale=0.25, logit_softcap=None, causal_rows=True)
    assert calls == [1]
    assert attention.resolve_implementation(None, 4096, fused_supported=lambda: True) == "fused"


def test_explicit_fused_request_it_cannot_serve_names_the_reason():
    mask, _ = _layout(16, 2, seed=6)
    q, k, v = _qkv(2, 16, 2, 1, 16, seed=6)
    with pytest.raises(ValueError, match="bfloat16"):
        attention.dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                        mask, scale=0.25, logit_softcap=None, implementation="fused",
                                        causal_rows=True)
    with pytest.raises(ValueError, match="softcap 2.0"):
        attention.dot_product_attention(q, k, v, mask, scale=0.25, logit_softcap=2.0, implementation="fused",
                                        causal_rows=True)


def test_model_loss_and_gradients_match_the_blocked_path_on_packed_rows():
    rng = np.random.default_rng(7)
    tokens = jnp.asarray(rng.integers(0, 256, size=(3, 90)), jnp.int32)
    positions = np.tile(np.arange(90), (3, 1))
    segments = np.ones((3, 90), np.int32)
    segments[1, 60:] = 0
    segments[2, 40:] = 2
    positions[2, 40:] -= 40
    live = jnp.asarray(segments != 0)[..., None]

    def run(impl):
        cfg = models.get_preset("llama3-tiny", attention_impl=impl)
        graphdef, params = models.init_params(cfg, seed=0)

        def loss(params):
            hidden, _ = models.apply(graphdef, params, tokens, positions_BxT=jnp.asarray(positions),
                                     segments_BxT=jnp.asarray(segments))
            return jnp.sum(jnp.where(live, jnp.tanh(hidden), 0.0))

        return jax.value_and_grad(loss)(params)

    (loss_fused, grad_fused), (loss_blocked, grad_blocked) = run("fused"), run("blocked")
    np.testing.assert_allclose(loss_fused, loss_blocked, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad_fused), jax.tree.leaves(grad_blocked)):
        # float32 sums over 270 tokens in a different order: tolerance relative to the leaf's scale
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5 * float(jnp.abs(b).max()))


def test_a_compiler_that_fails_is_reported_with_its_output(tmp_path, monkeypatch):
    fake = tmp_path / "broken-c++"
    fake.write_text("#!/bin/sh\necho 'fake compiler: no such target' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PREFJAX_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="fake compiler: no such target"):
        fused_attention._build(str(fake))
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written is cached
