"""The gated MLP activation's custom VJP, which keeps the step's saved activations at the arithmetic's count.

`layers.gated_activation` must give exactly the gradients of the plain
expressions (written out here independently from the activations' formulas)
while saving only gate and up for the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from prefjax.models import layers


def _inputs(shape=(3, 7, 32), seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(k, shape) for k in keys[:3]] + [jax.random.normal(keys[3], shape[-1:])]


@pytest.mark.parametrize("activation,fn", [("silu", lambda g: g / (1 + jnp.exp(-g))),
                                           ("gelu_tanh", lambda g: 0.5 * g * (1 + jnp.tanh(
                                               np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))))])
def test_gated_activation_values_and_gradients_equal_the_plain_expression(activation, fn):
    gate, up, weights, _ = _inputs(seed=1)
    np.testing.assert_allclose(layers.gated_activation(activation, gate, up), fn(gate) * up, rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda g, u: jnp.sum(layers.gated_activation(activation, g, u) * weights), argnums=(0, 1))(gate, up)
    want = jax.grad(lambda g, u: jnp.sum(fn(g) * u * weights), argnums=(0, 1))(gate, up)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _saved_shapes(f, *args):
    return sorted(tuple(aval.shape) for aval, _ in saved_residuals(f, *args) if aval.size > 32)


def test_backward_keeps_only_gate_and_up():
    gate, up, _, _ = _inputs()
    lean = _saved_shapes(lambda g, u: jnp.sum(layers.gated_activation("silu", g, u)), gate, up)
    assert lean == [(3, 7, 32)] * 2
    # autodiff of the plain expression keeps more arrays of that size (the sigmoid, the activation)
    plain = _saved_shapes(lambda g, u: jnp.sum(jax.nn.silu(g) * u), gate, up)
    assert plain.count((3, 7, 32)) > 2
