"""Per-leaf checksums of a state pytree's values, computed where the values live.

    record = state_digest.describe_tree(state)     # {leaf key: LeafDigest}, one pass on device
    record["params/w"].digest, record["params/w"].finite

A leaf's digest is a 32-bit checksum of its bytes: each element is bitcast to unsigned
words, each word is mixed with its row-major position (murmur3's finaliser, a bijection,
so changing any one element always changes the sum), and the mixed words are added with
wrap-around. Addition modulo 2**32 is associative and commutative, so the digest does not
depend on how the array is sharded, on how many devices or processes hold it, or on the
order XLA reduces in: a checkpoint restored onto another mesh gets the same digest.

Each array leaf goes through a small jitted function, compiled once per shape and dtype (a
collective that every process calls in the same order in a multi-process run, like the
train step); the result is a few bytes per leaf. Host values (Python scalars, numpy arrays) are digested with the same arithmetic in
numpy. Float leaves also get an all-finite flag.

Leaf keys name a leaf by its path, one segment per level joined with "/" ("params/w",
"opt_state/0/mu/w"): the same key whether the tree is a dataclass, a namedtuple or the
dicts and lists orbax's metadata returns for it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# murmur3's 32-bit finaliser constants, and the golden-ratio multiplier that spreads positions.
_M1, _M2, _GOLDEN = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9


@dataclasses.dataclass(frozen=True)
class LeafDigest:
    """What is recorded for one leaf: enough to tell a changed value from a changed config."""

    shape: tuple[int, ...]
    dtype: str
    digest: int
    finite: bool | None  # None for integer and boolean leaves

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype, "digest": self.digest}
        if self.finite is not None:
            out["finite"] = self.finite
        return out


def leaf_key(path: tuple[Any, ...]) -> str:
    """"params/w" for the path of params["w"] (dict keys, attributes, indices alike)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):  # DictKey/FlattenedIndexKey, GetAttrKey, SequenceKey
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def leaf_label(path: tuple[Any, ...]) -> str:
    """"params['w']": the leaf as Python would index it, for messages."""
    return jax.tree_util.keystr(path).lstrip(".")


def is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array)


def describe_tree(tree: Any) -> dict[str, LeafDigest]:
    """{leaf key: LeafDigest} for every leaf of `tree` (arrays, numpy values, Python scalars)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out: dict[str, LeafDigest] = {}
    on_device: dict[Any, list[tuple[str, jax.Array]]] = {}
    for path, leaf in flat:
        key = leaf_key(path)
        if is_array(leaf):
            on_device.setdefault(_device_key(leaf), []).append((key, leaf))
        else:
            out[key] = _host_digest(leaf)
    for devices, items in on_device.items():
        fn = _digest_fn(devices)
        # One small program per distinct shape and dtype (jit's cache): a model's layers share a
        # few shapes, so this compiles far less than one program over the whole tree would (5 s
        # for 200 leaves on one CPU core). Each result is read before the next leaf is dispatched:
        # on CPU, programs with collectives in flight together can deadlock XLA's rendezvous.
        for key, leaf in items:
            digest, finite = fn(leaf)
            # Replicated outputs: every process reads its own copy (no cross-host fetch).
            out[key] = LeafDigest(tuple(leaf.shape), np.dtype(leaf.dtype).name,
                                  int(np.asarray(digest.addressable_data(0))),
                                  bool(np.asarray(finite.addressable_data(0))) if _is_inexact(leaf.dtype) else None)
    return {key: out[key] for key in (leaf_key(path) for path, _ in flat)}  # in tree order


def labels(tree: Any) -> dict[str, str]:
    """{leaf key: leaf label} of `tree`, for naming leaves in messages."""
    return {leaf_key(path): leaf_label(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


# -- device side -------------------------------------------------------------------------------


def _device_key(leaf: jax.Array) -> tuple[Any, ...]:
    return tuple(sorted(leaf.sharding.device_set, key=lambda d: (d.process_index, d.id)))


@functools.cache
def _digest_fn(devices: tuple[Any, ...]) -> Any:
    """The jitted digest of one leaf, with its outputs replicated over `devices`."""
    mesh = jax.sharding.Mesh(np.array(devices), ("all",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def digest_one(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        finite = jnp.all(jnp.isfinite(x)) if _is_inexact(x.dtype) else jnp.bool_(True)
        return _digest_words(*_words(x)), finite

    return jax.jit(digest_one, out_shardings=(replicated, replicated))


def _is_inexact(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _words(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """(uint32 words of x's bytes, their shape): 64-bit elements become two words."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32), x.shape
    bits = jnp.dtype(x.dtype).itemsize * 8
    if jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits < 8:  # int4 and the like
        x, bits = x.astype(jnp.int8), 8
    if bits == 64:
        words = lax.bitcast_convert_type(x, jnp.uint32)  # trailing axis of 2
        return words, words.shape
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32), x.shape


def _digest_words(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # Row-major positions from per-axis iotas, not a reshape: a reshape of a sharded array can
    # make XLA move data between devices, while this stays elementwise until the final sum.
    position = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        position = position + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return jnp.sum(_mix(words ^ (position * jnp.uint32(_GOLDEN)), jnp), dtype=jnp.uint32)


def _mix(h: Any, xp: Any) -> Any:
    """murmur3's fmix32 on uint32 arrays of numpy or jax.numpy (a bijection of 32-bit words)."""
    h = h ^ (h >> 16)
    h = h * xp.uint32(_M1)
    h = h ^ (h >> 13)
    h = h * xp.uint32(_M2)
    return h ^ (h >> 16)


# -- host side ---------------------------------------------------------------------------------


def _host_digest(leaf: Any) -> LeafDigest:
    """The same digest for a numpy value or Python scalar (int -> int64, float -> float64)."""
    value = np.asarray(leaf)
    finite = bool(np.all(np.isfinite(value))) if np.issubdtype(value.dtype, np.inexact) else None
    return LeafDigest(tuple(value.shape), value.dtype.name, host_digest(value), finite)


def host_digest(value: np.ndarray) -> int:
    """The digest of a numpy array, as the device computes it for a jax array of equal values."""
    value = np.ascontiguousarray(value)
    if np.issubdtype(value.dtype, np.complexfloating):
        value = np.stack([value.real, value.imag], axis=-1)
    if value.dtype == np.bool_:
        words = value.astype(np.uint32).reshape(-1)
    elif value.dtype.itemsize == 8:
        words = value.reshape(-1).view(np.uint32)  # little-endian: low word first, as on device
    else:
        if np.issubdtype(value.dtype, np.integer) and value.dtype.itemsize * 8 != np.iinfo(value.dtype).bits:
            value = value.astype(np.int8)
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[value.dtype.itemsize]
        words = value.reshape(-1).view(unsigned).astype(np.uint32)
    position = np.arange(words.size, dtype=np.uint64).astype(np.uint32)
    with np.errstate(over="ignore"):
        mixed = _mix(words ^ (position * np.uint32(_GOLDEN)), np)
        return int(np.sum(mixed, dtype=np.uint32))
