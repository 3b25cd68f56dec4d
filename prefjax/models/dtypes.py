"""Dtype names as configs spell them ("float32", "bfloat16", "float16") -> jnp dtypes."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> Any:
    """The jnp dtype named `name` (KeyError for an unknown name; configs validate names first)."""
    return DTYPES[name]
