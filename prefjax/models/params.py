"""Model parameters as pure pytrees, created directly in their shards.

prefjax keeps parameters as nested dicts of arrays (`nnx.State.to_pure_dict()`
layout): optax, orbax, the Hugging Face importer and LoRA all work on them.
The module structure (`graphdef`) is static and recombined inside jitted code
with `apply`.

`init_params` never materialises a full model on one device: it traces the
constructor abstractly (`nnx.eval_shape`), derives each parameter's sharding
from its logical axes, and runs the initialiser under `jax.jit` with those
out-shardings, so each device computes only its own shard.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
from flax import nnx
from jax.sharding import Mesh

from prefjax import sharding
from prefjax.models.config import ModelConfig
from prefjax.models.transformer import Cache, Transformer

Array = jax.Array
Params = dict[str, Any]


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, Params, Params]:
    """(graphdef, abstract params as ShapeDtypeStructs, logical axes per param)."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    shapes = jax.tree.map(lambda v: v.get_value(), state, is_leaf=_is_variable)
    axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state, is_leaf=_is_variable)
    return graphdef, _to_pure(shapes), _to_pure(axes)


def _to_pure(state_like: Any) -> Params:
    """nnx.State (whose leaves may be tuples, not arrays) -> nested plain dicts."""
    def convert(node):
        if isinstance(node, (nnx.State, dict)):
            return {k: convert(v) for k, v in node.items()}
        return node

    return convert(state_like)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Optional[sharding.Rules] = None) -> Params:
    """NamedSharding per parameter, from its logical axes and the rules."""
    _, shapes, axes = abstract(cfg)
    return sharding.tree_shardings(mesh, shapes, axes, rules)


def init_params(cfg: ModelConfig, seed: int = 0, mesh: Optional[Mesh] = None,
                rules: Optional[sharding.Rules] = None) -> tuple[nnx.GraphDef, Params]:
    """(graphdef, params) with random initial values, each placed in its shard.

    Without a mesh the parameters land on the default device.
    """
    graphdef, _, _ = abstract(cfg)
    return graphdef, _initialiser(cfg, mesh, rules)(jax.random.key(seed))


@functools.lru_cache(maxsize=8)
def _initialiser(cfg: ModelConfig, mesh: Optional[Mesh], rules: Optional[sharding.Rules]) -> Any:
    """The jitted initialiser of one model on one mesh, the PRNG key its argument: compiling it takes
    seconds even for a tiny model (every weight's random draw), so a process that builds the same
    model again (another seed, a rerun in a notebook or a test) reuses the program."""
    def create(key: Array) -> Params:
        return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(key))))

    out_shardings = None if mesh is None else param_shardings(cfg, mesh, rules)
    return jax.jit(create, out_shardings=out_shardings)


def apply(graphdef: nnx.GraphDef, params: Params, tokens_BxT: Array, **kwargs: Any,
          ) -> tuple[Array, Optional[Cache]]:
    """The model's forward on `params` (inside or outside jit): (hidden [B, T, D], cache)."""
    return nnx.merge(graphdef, params)(tokens_BxT, **kwargs)


def unembedding(graphdef: nnx.GraphDef, params: Params) -> Array:
    """The [D, V] unembedding matrix of `params` (the transposed embedding when tied)."""
    return nnx.merge(graphdef, params).unembedding()


def count(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
