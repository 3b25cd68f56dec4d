"""state_digest: the per-leaf checksums a checkpoint records are the same however the state is
sharded, equal on host and device, and change with any changed element."""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from prefjax import sharding
from prefjax.train import state_digest

DTYPES = [np.float32, jnp.bfloat16, np.float16, np.int32, np.int8, np.uint8, np.bool_]


def _array(dtype, shape=(8, 12), seed=0) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(shape)
    return (values > 0) if dtype is np.bool_ else (values * 50).astype(dtype)


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_digest_ignores_sharding_and_matches_numpy(dtype, mesh):
    value = _array(dtype)
    expected = state_digest.host_digest(value)
    for spec in (PartitionSpec(), PartitionSpec("fsdp"), PartitionSpec(None, "fsdp"), PartitionSpec("data", "fsdp")):
        leaf = state_digest.describe_tree({"x": jax.device_put(value, NamedSharding(mesh, spec))})["x"]
        assert leaf.digest == expected, spec
        assert leaf.shape == (8, 12) and leaf.dtype == np.dtype(dtype).name
    single = state_digest.describe_tree({"x": jnp.asarray(value)})["x"]
    assert single.digest == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_any_changed_element_changes_the_digest(dtype):
    value = _array(dtype, shape=(5, 7))
    base = state_digest.host_digest(value)
    seen = {base}
    for i in range(value.size):
        changed = value.copy().reshape(-1)
        changed[i] = ~changed[i] if dtype is np.bool_ else changed[i] + np.array(1, dtype)
        digest = state_digest.host_digest(changed.reshape(value.shape))
        assert digest not in seen, i
        seen.add(digest)
    # Moved values (a transpose-like mix-up, two rows swapped) are caught too.
    assert state_digest.host_digest(value[::-1]) != base
    assert state_digest.host_digest(value.reshape(7, 5)) == base  # same bytes, same positions


def test_finite_flags_and_python_scalars():
    tree = {"w": jnp.array([1.0, jnp.nan]), "b": jnp.ones(3, jnp.bfloat16), "count": jnp.int32(2), "step": 7,
            "lr": 0.5, "host": np.array([1.0, np.inf])}
    leaves = state_digest.describe_tree(tree)
    assert [key for key in leaves] == ["b", "count", "host", "lr", "step", "w"]  # tree order
    assert leaves["w"].finite is False and leaves["b"].finite is True and leaves["host"].finite is False
    assert leaves["count"].finite is None and leaves["step"].finite is None
    assert leaves["step"] == state_digest.LeafDigest((), "int64", state_digest.host_digest(np.int64(7)), None)
    assert leaves["lr"].dtype == "float64" and leaves["lr"].finite is True
    assert leaves["w"].to_json() == {"shape": [2], "dtype": "float32", "digest": leaves["w"].digest, "finite": False}
    assert "finite" not in leaves["count"].to_json()


def test_leaf_keys_are_the_same_for_dataclasses_namedtuples_and_dicts():
    Adam = collections.namedtuple("Adam", ["count", "mu"])

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class State:
        params: dict
        opt_state: tuple

    state = State(params={"w": jnp.ones(2)}, opt_state=(Adam(count=jnp.int32(0), mu={"w": jnp.zeros(2)}),))
    # What orbax's metadata gives for the same tree: dicts and lists.
    as_saved = {"params": {"w": 0}, "opt_state": [{"count": 0, "mu": {"w": 0}}]}
    keys = list(state_digest.describe_tree(state))
    assert keys == ["params/w", "opt_state/0/count", "opt_state/0/mu/w"]
    assert sorted(keys) == sorted(state_digest.labels(as_saved))
    assert list(state_digest.labels(state).values()) == ["params['w']", "opt_state[0].count", "opt_state[0].mu['w']"]
