"""Sharded parameters and forwards on 8 fake CPU devices equal the single-device ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from prefjax import models, sharding

MESHES = [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 2, "tensor": 4}]


def test_suite_has_eight_fake_devices():
    assert len(jax.devices()) == 8


def test_make_mesh_fills_one_axis_and_rejects_bad_shapes():
    mesh = sharding.make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="needs 6 devices, but 8"):
        sharding.make_mesh({"data": 3, "tensor": 2})
    with pytest.raises(ValueError, match="only one axis may be -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match=r"mesh axes \['model'\]"):
        sharding.make_mesh({"model": 8})


def test_logical_to_spec_drops_axes_that_do_not_divide():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == PartitionSpec(
        "fsdp", None, None)
    assert sharding.logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == PartitionSpec(
        "fsdp", "tensor", None)
    assert sharding.logical_to_spec(("batch", "length"), (8, 5), mesh) == PartitionSpec(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_to_spec(("nonsense",))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("name", ["llama3-tiny", "gemma2-tiny"])
def test_sharded_init_and_forward_equal_single_device(name, shape):
    cfg = models.get_preset(name)
    graphdef, params = models.init_params(cfg, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (8, 12), 1, cfg.vocab_size)
    segments = jnp.ones((8, 12), jnp.int32).at[1, 7:].set(0)
    expected = models.apply(graphdef, params, tokens, segments_BxT=segments)[0]

    mesh = sharding.make_mesh(shape)
    _, sharded = models.init_params(cfg, seed=0, mesh=mesh)
    wanted = models.param_shardings(cfg, mesh)
    for leaf, want, base in zip(jax.tree.leaves(sharded), jax.tree.leaves(wanted), jax.tree.leaves(params)):
        assert leaf.sharding == want
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(base))  # born sharded, same values
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), tokens.shape, mesh))
    with sharding.use_mesh(mesh):
        forward = jax.jit(lambda p, t, s: models.apply(graphdef, p, t, segments_BxT=s)[0])
        out = forward(sharded, jax.device_put(tokens, batch_sharding), jax.device_put(segments, batch_sharding))
    np.testing.assert_allclose(out, expected, atol=2e-5)


def test_params_are_never_built_whole_on_one_device():
    """The jitted initialiser's outputs are sharded: no device holds a full fsdp-sharded kernel."""
    cfg = models.get_preset("llama3-tiny")
    mesh = sharding.make_mesh({"fsdp": 8})
    _, params = models.init_params(cfg, seed=0, mesh=mesh)
    q = params["layers"][0]["attn"]["q"]
    shard_shapes = {s.data.shape for s in q.addressable_shards}
    assert shard_shapes == {(cfg.hidden_size // 8, cfg.num_heads, cfg.head_dim)}


def test_shards_along_counts_the_pieces_of_a_dimension_on_the_current_mesh():
    assert sharding.shards_along("batch", 16) == 1  # no mesh
    with sharding.use_mesh(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        assert sharding.shards_along("batch", 16) == 4
        assert sharding.shards_along("batch", 2) == 2  # fsdp does not divide what data leaves
        assert sharding.shards_along("length", 16) == 1
        assert sharding.shards_along("heads", 8) == 2
    # a mesh made elsewhere, without prefjax's fsdp and tensor axes
    with jax.set_mesh(jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))):
        assert sharding.shards_along("batch", 16) == 8
        assert sharding.shards_along("heads", 8) == 1
