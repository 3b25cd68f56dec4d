"""The one batch type (prefjax.batch.Batch): a pytree whose static layout survives jit, per-process
slices, padding, micro-batches, sharded global arrays, and rows built from token sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import sharding
from prefjax.batch import Batch, processes_to_global_rows
from prefjax.data import synthetic_batches


def _batch(b=4, k=2, t=12, seed=0):
    return synthetic_batches.random_batch(b, k, t, 50, seed=seed)


def test_layout_and_responses_are_static_pytree_metadata():
    batch = _batch(k=3)
    leaves, treedef = jax.tree.flatten(batch)
    assert len(leaves) == 10  # the ten arrays; branches and ref_logps are absent
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert rebuilt.num_responses == 3 and rebuilt.layout == "unpacked"
    seen = []

    @jax.jit
    def read(x):
        seen.append((x.num_responses, x.layout))  # plain Python values at trace time
        return jnp.sum(x.tokens)

    read(batch.map(jnp.asarray))
    assert seen == [(3, "unpacked")]
    with pytest.raises(ValueError, match="layout='rows'"):
        batch.replace(layout="rows")


def test_process_slice_takes_a_block_of_examples_in_the_local_layout():
    batch = _batch(b=4, k=2)
    local = batch.process_slice(2, 1)  # examples 2 and 3
    assert local.num_examples == 2 and local.tokens.shape == (4, 12)
    for k in range(2):
        for bl in range(2):
            np.testing.assert_array_equal(local.tokens[k * 2 + bl], batch.tokens[k * 4 + 2 + bl])
    np.testing.assert_array_equal(local.weight, batch.weight[2:])
    np.testing.assert_array_equal(local.scores, batch.scores[2:])
    live = local.segments > 0
    assert set(local.example_id[live].tolist()) == {0, 1}  # ids renumbered from 0
    # stacking the two processes' slices and reordering gives back the global layout
    parts = [batch.process_slice(2, p) for p in (0, 1)]
    stacked = np.concatenate([p.tokens for p in parts])
    np.testing.assert_array_equal(processes_to_global_rows(stacked, 2, 2), batch.tokens)
    assert batch.process_slice(1, 0) is batch


def test_pad_length_fills_each_field_with_its_padding_value():
    batch = _batch(t=8)
    wider = batch.pad_length(11, pad_id=7)
    assert wider.tokens.shape == (8, 11)
    np.testing.assert_array_equal(wider.tokens[:, 8:], 7)
    np.testing.assert_array_equal(wider.example_id[:, 8:], -1)
    np.testing.assert_array_equal(wider.segments[:, 8:], 0)
    np.testing.assert_array_equal(wider.tokens[:, :8], batch.tokens)
    assert batch.pad_length(8, 0) is batch
    with pytest.raises(ValueError, match="cannot shorten"):
        batch.pad_length(4, 0)


def test_microbatches_split_examples_and_keep_each_in_the_unpacked_layout():
    batch = _batch(b=4, k=2).replace(ref_logps=np.arange(8, dtype=np.float32).reshape(4, 2))
    micro = batch.microbatches(2)
    assert micro.tokens.shape == (2, 4, 12) and micro.ref_logps.shape == (2, 2, 2)
    second = micro.microbatch(1)
    np.testing.assert_array_equal(second.tokens[1], batch.tokens[3])  # response 0 of example 3
    np.testing.assert_array_equal(second.tokens[3], batch.tokens[7])  # response 1 of example 3
    np.testing.assert_array_equal(second.ref_logps, batch.ref_logps[2:])
    with pytest.raises(ValueError, match="unpacked"):
        batch.replace(layout="packed").microbatches(2)


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_to_global_places_every_field_on_the_batch_axis(mesh_shape):
    mesh = sharding.make_mesh(mesh_shape)
    batch = _batch(b=8)
    arrays = batch.to_global(mesh)
    assert arrays.num_responses == 2 and arrays.layout == "unpacked"
    for name, value in {**arrays.rows(), **arrays.columns()}.items():
        assert isinstance(value, jax.Array)
        np.testing.assert_array_equal(np.asarray(value), getattr(batch, name))
        assert value.sharding.spec[0] == ("data", "fsdp")
    shardings = batch.shardings(mesh)
    assert shardings.tokens == arrays.tokens.sharding


def test_from_sequences_scores_the_responses():
    rows = Batch.from_sequences([[5, 6], [7]], [[8, 1], [9, 9, 1]], 6, pad_id=0)
    assert rows.num_responses == 1 and rows.num_examples == 2
    np.testing.assert_array_equal(rows.positions[0], np.arange(6))
    np.testing.assert_array_equal(rows.example_id, [[0, 0, 0, 0, -1, -1], [1, 1, 1, 1, -1, -1]])
    np.testing.assert_array_equal(rows.response_id[0], [0, 0, 0, 0, -1, -1])
    np.testing.assert_array_equal(rows.weight, [1.0, 1.0])
