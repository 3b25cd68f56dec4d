"""The gated MLP's custom VJP (`layers.gated_mlp`), which keeps the step's saved activations small.

It must give exactly the values and gradients (input and all three weights) of
the plain expression, written out here independently from the activations'
formulas, in float32 and bfloat16, while saving only x, gate and up for the
backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from prefjax.models import layers

_ACTIVATIONS = {
    "silu": lambda g: g / (1 + jnp.exp(-g)),
    "gelu_tanh": lambda g: 0.5 * g * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))),
}


def _plain_mlp(activation, x, w_gate, w_up, w_down):
    return ((_ACTIVATIONS[activation](x @ w_gate)) * (x @ w_up)) @ w_down


def _inputs(d=12, f=20, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (3, 7, d))
    w_gate, w_up = (jax.random.normal(k, (d, f)) / np.sqrt(d) for k in keys[1:3])
    w_down = jax.random.normal(keys[3], (f, d)) / np.sqrt(f)
    weights = jax.random.normal(keys[4], (3, 7, d))
    return (x, w_gate, w_up, w_down), weights


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_values_and_gradients_equal_the_plain_expression(activation):
    args, weights = _inputs()
    np.testing.assert_allclose(layers.gated_mlp(activation, *args), _plain_mlp(activation, *args),
                               rtol=1e-5, atol=1e-5)
    argnums = (0, 1, 2, 3)
    got = jax.grad(lambda *a: jnp.sum(layers.gated_mlp(activation, *a) * weights), argnums)(*args)
    want = jax.grad(lambda *a: jnp.sum(_plain_mlp(activation, *a) * weights), argnums)(*args)
    for g, w, name in zip(got, want, ("x", "gate", "up", "down")):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)
        assert float(jnp.abs(w).max()) > 1e-2  # real gradients, not zeros


def test_bfloat16_gradients_keep_dtypes_and_track_float32():
    args, weights = _inputs(seed=1)
    low = [a.astype(jnp.bfloat16) for a in args]
    grads = jax.grad(lambda *a: jnp.sum(layers.gated_mlp("silu", *a).astype(jnp.float32) * weights),
                     (0, 1, 2, 3))(*low)
    want = jax.grad(lambda *a: jnp.sum(_plain_mlp("silu", *a) * weights), (0, 1, 2, 3))(*args)
    for g, w in zip(grads, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), w, rtol=0.1, atol=0.05 * float(jnp.abs(w).max()))


def _saved_shapes(f, *args):
    return sorted(tuple(aval.shape) for aval, _ in saved_residuals(f, *args) if len(aval.shape) == 3)


def test_backward_keeps_only_x_gate_and_up():
    args, _ = _inputs()
    lean = _saved_shapes(lambda *a: jnp.sum(layers.gated_mlp("silu", *a)), *args)
    assert lean == [(3, 7, 12), (3, 7, 20), (3, 7, 20)]
    # autodiff of the plain expression keeps more [tokens, F] arrays (hidden product, sigmoid, activation)
    plain = _saved_shapes(lambda *a: jnp.sum(_plain_mlp("silu", *a)), *args)
    assert plain.count((3, 7, 20)) > 2


def test_compiled_backward_recomputes_late():
    # JAX-level residuals are not the whole story: XLA schedules the backward's recomputation
    # (act(gate), the hidden product and its transpose) as soon as its inputs exist, and if
    # those are only the saved gate and up it runs right after the forward, keeping 2 more
    # [tokens, F] arrays per layer alive through the backward. The compiled program's
    # temporaries must stay below saved (x, gate, up per layer) + one layer's worth of
    # transients: halfway to what the early schedule needs.
    n_layers, tokens, d, f = 8, 2048, 16, 256
    keys = jax.random.split(jax.random.key(0), 3 * n_layers + 1)
    x = jax.random.normal(keys[0], (1, tokens, d))
    weights = [(jax.random.normal(keys[3 * i + 1], (d, f)) / 4, jax.random.normal(keys[3 * i + 2], (d, f)) / 4,
                jax.random.normal(keys[3 * i + 3], (f, d)) / 16) for i in range(n_layers)]

    def loss(ws, h):
        for w_gate, w_up, w_down in ws:
            h = h + layers.gated_mlp("silu", h, w_gate, w_up, w_down)
        return jnp.sum(h * h)

    temp = jax.jit(jax.grad(loss)).lower(weights, x).compile().memory_analysis().temp_size_in_bytes
    per_token_floats = temp / (tokens * 4)
    saved = n_layers * (d + 2 * f)
    assert per_token_floats < saved + n_layers * f, (per_token_floats, saved)
