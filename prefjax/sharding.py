"""Meshes and logical-axis sharding rules.

Parameters and activations name their axes logically ("vocab", "embed",
"heads", "mlp", "batch", ...); a rule table (config data, not code) maps each
logical name to zero or more mesh axes ("data", "fsdp", "tensor"). Changing
the parallelism of a run is a change of rules and mesh shape, never of model
code.

    mesh = make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    with use_mesh(mesh, rules):             # the model's activation constraints see them
        ...

A mesh axis that does not divide a dimension is dropped for that dimension
(the dimension is replicated over it) rather than failing: tiny test models
with 2 KV heads still run on a 4-way tensor axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = Union[None, str, tuple[str, ...]]
Rules = tuple[tuple[str, MeshAxes], ...]

# FSDP over parameters' embed axis, tensor parallelism over heads/mlp/vocab,
# batch over data x fsdp. Sequence ("length") is not sharded by default.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("prefjax_sharding_rules", default=DEFAULT_RULES)


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with axes data/fsdp/tensor; one size may be -1 to take the remaining devices.

    Raises ValueError naming the shape and the device count when they disagree.
    """
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not among {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh {dict(shape)}: only one axis may be -1, got {fill}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(shape)}: {len(devices)} devices are not divisible by {known}")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh {dict(shape)} needs {math.prod(sizes.values())} devices, but {len(devices)} are available"
        )
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Optional[Rules] = None) -> Iterator[Mesh]:
    """Sets the mesh (jax.set_mesh) and the logical rules for the enclosed code."""
    token = _RULES.set(tuple(rules) if rules is not None else DEFAULT_RULES)
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _RULES.reset(token)


def current_rules() -> Rules:
    return _RULES.get()


def _mesh_axes_for(name: Optional[str], rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no sharding rule; rules cover {[r[0] for r in rules]}")


def logical_to_spec(
    logical_axes: Sequence[Optional[str]],
    shape: Optional[Sequence[int]] = None,
    mesh: Optional[Mesh] = None,
    rules: Optional[Rules] = None,
) -> PartitionSpec:
    """PartitionSpec for an array whose axes have these logical names.

    With `shape` and `mesh`, a mesh axis is kept only if it divides the
    dimension (after the axes already assigned to it) and is not used by an
    earlier dimension; otherwise that dimension is replicated over it.
    """
    rules = current_rules() if rules is None else rules
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        kept = []
        remaining = None if shape is None else shape[i]
        for axis in _mesh_axes_for(name, rules):
            if axis in used:
                continue
            size = 1 if mesh is None else mesh.shape[axis]
            if remaining is not None and mesh is not None and remaining % size:
                continue
            kept.append(axis)
            used.add(axis)
            if remaining is not None:
                remaining //= size
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[Optional[str]], shape: Sequence[int],
                   rules: Optional[Rules] = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    """with_sharding_constraint by logical names under the current mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def shards_along(logical_axis: str, size: int) -> int:
    """Pieces the current mesh cuts a dimension of this logical axis and size into (1 without one).

    For choices made while tracing that depend on what one device holds, e.g. the rows of
    the batch per device. Mesh axes that do not divide what is left are skipped, as in
    `logical_to_spec`, and so are rule axes the mesh lacks (a mesh made elsewhere).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return 1
    pieces, remaining = 1, size
    for axis in _mesh_axes_for(logical_axis, current_rules()):
        n = dict(mesh.shape).get(axis, 1)
        if remaining % n == 0:
            pieces, remaining = pieces * n, remaining // n
    return pieces


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def tree_shardings(mesh: Mesh, abstract_tree: Any, logical_axes_tree: Any,
                   rules: Optional[Rules] = None) -> Any:
    """NamedShardings for a tree of abstract arrays from a matching tree of logical axes.

    Leaves of `logical_axes_tree` are tuples of names (or None for replicated).
    """
    def one(axes, leaf):
        if axes is None or len(leaf.shape) == 0:
            return replicated(mesh)
        return named_sharding(mesh, axes, leaf.shape, rules)

    # The axes tree leads: its tuple leaves would otherwise be read as subtrees.
    return jax.tree.map(one, logical_axes_tree, abstract_tree,
                        is_leaf=lambda x: isinstance(x, tuple) or x is None)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole global array `x` as numpy on every process: gathered across processes when this
    process holds only some of its shards (collective then: every process must call it)."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
