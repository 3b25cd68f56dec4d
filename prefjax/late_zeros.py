"""Zero buffers that XLA cannot fill before the backward pass needs them.

A zero-filled buffer depends on nothing, so XLA CPU's scheduler fills it at the top of the
program and holds it through the whole forward pass: a scatter-add's target or a loop's
gradient accumulator of [tokens, D] floats then sits beside the saved activations at the
step's peak. Tying the zeros to a value of the backward pass (0 times a finite element of
the incoming cotangent, which XLA does not fold away because x * 0 is not 0 for NaN x)
moves the fill to where that value exists.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp


def zeros_after(value: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Exact zeros of `shape` and `dtype` that cannot be computed before `value` is.

    Whatever `value` holds (NaN and inf included) the result is +/-0. The tie is elementwise
    over the leading axes that `value` and `shape` share (the batch axis first), so under a
    mesh each device ties its own shard: no element crosses devices. `value`'s other axes
    contribute their first entry.
    """
    shape = tuple(shape)
    lead = 0
    while lead < min(value.ndim, len(shape)) and value.shape[lead] == shape[lead]:
        lead += 1
    first = value[(slice(None),) * lead + (0,) * (value.ndim - lead)]
    tie = (jnp.where(jnp.isfinite(first), first, 0) * 0).astype(dtype)
    return jnp.broadcast_to(tie.reshape(shape[:lead] + (1,) * (len(shape) - lead)), shape)
