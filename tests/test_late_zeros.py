"""Zero buffers tied to a backward-pass value (`prefjax.late_zeros`) and the gradients that use them.

The zeros must be exact whatever the value holds and must survive compilation as a product
with the value (a constant would be filled at the program's start); their effect on a whole
step's compiled memory is checked in tests/models/test_memory_budget.py. The shared-prefix gather's
custom gradient (a scatter-add into such zeros) must equal autodiff's and a numpy count.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from prefjax import late_zeros, scoring


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zeros_are_exact_whatever_the_value(dtype):
    for first in (np.nan, np.inf, -np.inf, 3.0, -0.0):
        value = jnp.array([first, 1.0], jnp.float32)
        zeros = jax.jit(lambda v: late_zeros.zeros_after(v, (5, 3), dtype))(value)
        assert zeros.shape == (5, 3) and zeros.dtype == dtype
        np.testing.assert_array_equal(np.asarray(zeros, np.float32), np.zeros((5, 3)))


def test_zeros_still_read_the_value_once_compiled():
    # Folded into a constant, the zeros would be filled at the program's start again.
    compiled = jax.jit(lambda v: late_zeros.zeros_after(v, (64, 64))).lower(jnp.ones(3)).compile().as_text()
    assert "multiply" in compiled and "parameter(0)" in compiled
    constant = jax.jit(lambda v: jnp.zeros((64, 64))).lower(jnp.ones(3)).compile().as_text()
    assert "multiply" not in constant


def test_at_sources_gradient_is_the_scatter_add_of_a_gather():
    hidden = jax.random.normal(jax.random.key(0), (3, 6, 4))
    # repeated and out-of-order sources (a prompt's last token feeds every response's first target)
    source = jnp.array([[0, 2, 2, 5, -1, 1], [3, 3, 3, 0, 1, 2], [5, 4, 3, 2, 1, 0]])
    weights = jax.random.normal(jax.random.key(1), (3, 6, 4))
    got_value, got_grad = jax.value_and_grad(lambda h: jnp.sum(scoring.at_sources(h, source) * weights))(hidden)

    def plain(h):
        return jnp.sum(jnp.take_along_axis(h, jnp.clip(source, 0)[..., None], axis=1) * weights)

    np.testing.assert_allclose(got_value, plain(hidden), rtol=1e-6)
    np.testing.assert_allclose(got_grad, jax.grad(plain)(hidden), rtol=1e-6, atol=1e-6)
    # numpy: each source position collects the cotangents of the targets that read it
    want = np.zeros((3, 6, 4))
    for r in range(3):
        for t in range(6):
            want[r, max(int(source[r, t]), 0)] += np.asarray(weights[r, t])
    np.testing.assert_allclose(got_grad, want, rtol=1e-6, atol=1e-6)


def _collectives(fn, *args):
    text = jax.jit(fn).lower(*args).compile().as_text()
    return {op: len(re.findall(op + r"(-start)?\(", text)) for op in ("all-gather", "all-reduce", "collective-permute")}


def test_the_tie_adds_no_collective_under_a_mesh(monkeypatch):
    # Each device ties its own shard: the sharded gradients need exactly the collectives they
    # need with constant zeros (the unembedding's all-reduce), none to fetch a tie element.
    from prefjax import logprobs, sharding
    mesh = sharding.make_mesh({"data": 8})
    with sharding.use_mesh(mesh):
        rows = NamedSharding(mesh, PartitionSpec("data"))
        h = jax.device_put(jax.random.normal(jax.random.key(0), (16, 64, 32)), rows)
        w = jax.random.normal(jax.random.key(1), (32, 97))
        labels = jax.device_put(jnp.zeros((16, 64), jnp.int32), rows)
        mask = jax.device_put(jnp.asarray(np.arange(64)[None] >= np.arange(16)[:, None] * 3), rows)
        source = jax.device_put(jnp.tile(jnp.arange(64)[::-1], (16, 1)), rows)

        def loss(h):
            lp = logprobs.token_logps(scoring.at_sources(h, source), w, labels, mask_BxT=mask,
                                      chunk_size=8, tile_tokens=64)
            return jnp.sum(lp)

        tied = _collectives(jax.grad(loss), h)
        monkeypatch.setattr(late_zeros, "zeros_after", lambda v, shape, dtype=jnp.float32: jnp.zeros(shape, dtype))
        constant = _collectives(jax.grad(loss), h)
    assert tied == constant, (tied, constant)
