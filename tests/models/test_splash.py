"""TPU splash attention (run in Pallas interpret mode on CPU) equals the XLA attention path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models, sharding

T = 128


def _batch(cfg):
    tokens = jax.random.randint(jax.random.key(0), (2, T), 1, cfg.vocab_size)
    # Row 0: two packed sequences (positions restart); row 1: right padding.
    segments = jnp.array([[1] * 70 + [2] * 58, [1] * 100 + [0] * 28], jnp.int32)
    positions = jnp.array([list(range(70)) + list(range(58)), list(range(T))], jnp.int32)
    return tokens, positions, segments


def _loss(graphdef, params, tokens, positions, segments):
    hidden, _ = models.apply(graphdef, params, tokens, positions_BxT=positions, segments_BxT=segments)
    return jnp.sum(jnp.where(segments[..., None] > 0, hidden, 0.0) ** 2), hidden


@pytest.mark.parametrize("name", ["gemma2-tiny", "qwen3-tiny"])
def test_splash_matches_xla_forward_and_gradients(name):
    cfg = models.get_preset(name)
    graphdef, params = models.init_params(cfg, seed=1)
    splash_graphdef, _, _ = models.abstract(cfg.replace(attention_impl="splash"))
    batch = _batch(cfg)
    grad = jax.jit(jax.value_and_grad(_loss, argnums=1, has_aux=True), static_argnums=0)
    (want_loss, want_hidden), want_grads = grad(graphdef, params, *batch)
    (got_loss, got_hidden), got_grads = grad(splash_graphdef, params, *batch)
    mask = np.asarray(batch[2]) > 0
    np.testing.assert_allclose(np.asarray(got_hidden)[mask], np.asarray(want_hidden)[mask], atol=2e-5)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-4, rtol=2e-4)


def test_splash_under_a_mesh_equals_single_device():
    cfg = models.get_preset("mistral-tiny", attention_impl="splash")
    graphdef, params = models.init_params(cfg, seed=2)
    batch = _batch(cfg)
    want = models.apply(graphdef, params, batch[0], positions_BxT=batch[1], segments_BxT=batch[2])[0]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with sharding.use_mesh(mesh):
        placed = jax.device_put(params, models.param_shardings(cfg, mesh))
        got = jax.jit(lambda p, *b: models.apply(graphdef, p, b[0], positions_BxT=b[1], segments_BxT=b[2])[0])(
            placed, *batch)
    mask = np.asarray(batch[2]) > 0
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], atol=2e-5)


def test_splash_rejects_lengths_that_do_not_tile():
    cfg = models.get_preset("llama2-tiny", attention_impl="splash")
    graphdef, params = models.init_params(cfg)
    with pytest.raises(ValueError, match="multiple of 128"):
        models.apply(graphdef, params, jnp.ones((1, 100), jnp.int32))


def test_unknown_attention_impl_is_refused():
    with pytest.raises(ValueError, match="attention_impl"):
        models.get_preset("llama2-tiny", attention_impl="ring")
