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

from prefjax import models, sharding
from prefjax.models import layers
from prefjax.models.cpu import mlp_slices

_ACTIVATIONS = {
    "silu": lambda g: g / (1 + jnp.exp(-g)),
    "gelu_tanh": lambda g: 0.5 * g * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))),
}


def _plain_mlp(activation, x, w_gate, w_up, w_down):
    return ((_ACTIVATIONS[activation](x @ w_gate)) * (x @ w_up)) @ w_down


def _inputs(d=12, f=20, seed=0, length=7):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (3, length, d))
    w_gate, w_up = (jax.random.normal(k, (d, f)) / np.sqrt(d) for k in keys[1:3])
    w_down = jax.random.normal(keys[3], (f, d)) / np.sqrt(f)
    weights = jax.random.normal(keys[4], (3, length, d))
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


def test_on_the_accelerator_path_the_lean_backward_holds_less_than_autodiff(monkeypatch):
    # The custom VJP was measured on the CPU kernel's path; it runs on every backend, so on the
    # path GPU and TPU take (jax's XLA attention, no MLP backward slices) its compiled model
    # gradient must hold fewer temporaries than autodiff of the plain expression, at the same FLOPs.
    cfg = _shape(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 vocab_size=128, attention_impl="xla")
    graphdef, params = models.init_params(cfg, seed=0)
    tokens = jax.random.randint(jax.random.key(4), (4, 128), 0, 128)
    monkeypatch.setattr(mlp_slices, "mlp_backward_slices", lambda *args: 1)

    def compiled():
        def loss(p):
            hidden, _ = models.apply(graphdef, p, tokens)
            return jnp.sum(jnp.sin(hidden))
        program = jax.jit(jax.grad(loss)).lower(params).compile()
        cost = program.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return program.memory_analysis().temp_size_in_bytes, cost["flops"]

    lean_bytes, lean_flops = compiled()
    monkeypatch.setattr(layers, "gated_mlp", lambda act, *a: _plain_mlp(act, *a[:4]))
    plain_bytes, plain_flops = compiled()
    assert lean_bytes < plain_bytes, (lean_bytes, plain_bytes)
    assert lean_flops <= 1.02 * plain_flops, (lean_flops, plain_flops)


# ---------------------------------------------------------------------------------------------
# The backward over slices of the sequence axis


@pytest.mark.parametrize("activation,length,slices", [("silu", 8, 2), ("gelu_tanh", 8, 4), ("silu", 7, 7)])
def test_sliced_backward_equals_the_plain_expression(activation, length, slices):
    args, weights = _inputs(seed=2, length=length)
    argnums = (0, 1, 2, 3)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(layers.gated_mlp(activation, *a, slices) * weights), argnums))(*args)
    want = jax.grad(lambda *a: jnp.sum(_plain_mlp(activation, *a) * weights), argnums)(*args)
    for g, w, name in zip(got, want, ("x", "gate", "up", "down")):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_sliced_bfloat16_gradients_keep_dtypes_and_track_float32():
    args, weights = _inputs(seed=3, length=8)
    low = [a.astype(jnp.bfloat16) for a in args]
    grads = jax.grad(lambda *a: jnp.sum(layers.gated_mlp("silu", *a, 4).astype(jnp.float32) * weights),
                     (0, 1, 2, 3))(*low)
    want = jax.grad(lambda *a: jnp.sum(_plain_mlp("silu", *a) * weights), (0, 1, 2, 3))(*args)
    for g, w in zip(grads, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), w, rtol=0.1, atol=0.05 * float(jnp.abs(w).max()))


def test_slices_must_divide_the_sequence():
    args, _ = _inputs(length=7)
    with pytest.raises(ValueError, match="backward_slices=2 must be a positive divisor of the sequence length 7"):
        layers.gated_mlp("silu", *args, 2)
    with pytest.raises(ValueError, match="backward_slices=0"):
        jax.grad(lambda *a: jnp.sum(layers.gated_mlp("silu", *a, 0)))(*args)


def _shape(**sizes):
    return models.get_preset("llama2-tiny", **sizes)


def test_slices_follow_the_mlp_share_of_the_saved_activations():
    shallow = _shape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    deep = _shape(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64)
    # 7 F per token against all layers' saved activations (prefjax.models.memory_budget's count)
    from prefjax.models import memory_budget
    assert mlp_slices.mlp_backward_weight(shallow) == pytest.approx(
        7 * 128 / memory_budget.activation_floats_per_token(shallow))
    assert mlp_slices.mlp_backward_weight(shallow) > 2 * mlp_slices.MLP_BACKWARD_SHARE  # 2 layers, F = 2 D
    assert mlp_slices.mlp_backward_weight(deep) < mlp_slices.MLP_BACKWARD_SHARE
    weight = mlp_slices.mlp_backward_weight(shallow)  # 0.50: 3 slices wanted, 4 is the next divisor of 256
    assert mlp_slices.mlp_backward_slices(weight, 16, 256) == 4
    assert mlp_slices.mlp_backward_slices(weight, 16, 2048) == 4
    assert mlp_slices.mlp_backward_slices(weight, 16, 12) == 1  # 16 x 12 tokens: under the smallest slice
    assert mlp_slices.mlp_backward_slices(weight, 1, 1024) == 4  # 3 does not divide 1024; 256-token slices allowed
    assert mlp_slices.mlp_backward_slices(5.0, 1, 1024) == 4  # wants 25, stops at the 256-token floor
    assert mlp_slices.mlp_backward_slices(weight, 300, 9) == 3
    assert mlp_slices.mlp_backward_slices(mlp_slices.mlp_backward_weight(deep), 16, 2048) == 1


def test_model_gradients_are_the_same_with_and_without_slices(monkeypatch):
    cfg = _shape(hidden_size=32, intermediate_size=96, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                 vocab_size=64)
    graphdef, params = models.init_params(cfg, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, 64)

    def loss(p):
        hidden, _ = models.apply(graphdef, p, tokens)
        return jnp.sum(jnp.sin(hidden))

    sliced = mlp_slices.mlp_backward_slices(mlp_slices.mlp_backward_weight(cfg), 2, 256)
    assert sliced > 1
    with_slices = jax.jit(jax.grad(loss))(params)
    monkeypatch.setattr(mlp_slices, "MLP_BACKWARD_SHARE", 1e9)
    without = jax.jit(jax.grad(loss))(params)
    for a, b in zip(jax.tree.leaves(with_slices), jax.tree.leaves(without)):
        # float32 sums over the tokens in another order: agree to rounding of the largest entry
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_slices_cut_the_compiled_backward_temporaries():
    tokens, d, f = 4096, 16, 256
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (1, tokens, d))
    w_gate, w_up = (jax.random.normal(k, (d, f)) / 4 for k in keys[1:3])
    w_down = jax.random.normal(keys[3], (f, d)) / 16

    def temp(slices):
        loss = lambda *a: jnp.sum(jnp.square(layers.gated_mlp("silu", *a, slices)))  # noqa: E731
        compiled = jax.jit(jax.grad(loss, (0, 1, 2, 3))).lower(x, w_gate, w_up, w_down).compile()
        return compiled.memory_analysis().temp_size_in_bytes / (tokens * 4)  # floats per token

    # saved gate and up (2 F) stay; the backward's own [tokens, F] arrays shrink 4-fold
    whole, sliced = temp(1), temp(4)
    assert whole > 4 * f and sliced < whole - 2 * f, (whole, sliced)


def test_sliced_backward_under_a_mesh_equals_one_device():
    # 8 rows of 512 on a data x tensor mesh: 2 rows per device, still 4 slices of 256 tokens
    cfg = _shape(hidden_size=32, intermediate_size=96, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                 vocab_size=64)
    tokens = jax.random.randint(jax.random.key(2), (8, 512), 0, 64)
    assert mlp_slices.mlp_backward_slices(mlp_slices.mlp_backward_weight(cfg), 2, 512) > 1

    def grads(mesh):
        graphdef, params = models.init_params(cfg, seed=0, mesh=mesh)

        def loss(p):
            hidden, _ = models.apply(graphdef, p, tokens)
            return jnp.sum(jnp.sin(hidden))

        return jax.jit(jax.grad(loss))(params)

    single = grads(None)
    mesh = sharding.make_mesh({"data": 4, "tensor": 2})
    with sharding.use_mesh(mesh):
        sharded = grads(mesh)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
