"""Random, plausible inputs for any registered loss, built from its declared needs.

The registry-wide property tests (jit/vmap/grad, extremes, bfloat16, gradient
signs) and the loss benchmark build every loss's inputs here from
`LossSpec.requires` and `LossSpec.uses`, so a newly registered loss is covered
without editing them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from prefjax import losses
from prefjax.losses import types

TOKENS = 6  # T for per-token fields
LIST_SIZE = 4  # K for ranked lists
ATTRIBUTES = 3  # A for ratings

# Fields that carry the *policy's* log-probs or outputs: gradients flow into these.
POLICY_FIELDS = {
    types.PairLogps: ("chosen", "rejected", "chosen_token_logps", "rejected_token_logps",
                      "chosen_token_kl", "rejected_token_kl", "gold", "sample"),
    types.UnpairedLogps: ("logps", "kl_logps"),
    types.ListLogps: ("logps",),
    types.RewardPair: ("chosen", "rejected"),
    types.RatedResponses: ("predicted",),
}


def _field_value(cls: type, name: str, batch: int, rng: np.random.Generator) -> np.ndarray:
    """A plausible random value for one field of one container."""
    if cls is types.PairLogps:
        if name in ("chosen", "rejected", "ref_chosen", "ref_rejected", "gold", "prev_chosen", "prev_rejected",
                    "sample", "ref_sample"):
            return rng.uniform(-60.0, -5.0, batch)
        if name.endswith("_from_reference"):  # XPO: the first example's chosen, the second's rejected
            return (np.arange(batch) % 2 == (0 if name.startswith("chosen") else 1)).astype(np.float32)
        if name.endswith("_len"):
            return rng.integers(1, 30, batch).astype(np.float32)
        if name.endswith("_token_logps"):
            return rng.uniform(-5.0, -0.01, (batch, TOKENS))
        if name.endswith("_token_kl"):
            return rng.uniform(0.0, 2.0, (batch, TOKENS))
        if name.endswith("_mask"):
            lengths = rng.integers(1, TOKENS + 1, batch)
            return (np.arange(TOKENS)[None, :] < lengths[:, None]).astype(np.float32)
        if name == "score_rejected":
            return rng.uniform(0.0, 1.0, batch)
        if name == "score_chosen":
            return None  # derived from score_rejected below
        if name == "margin":
            return rng.uniform(0.0, 2.0, batch)
        if name == "weight":
            return np.ones(batch, np.float32)
    if cls is types.UnpairedLogps:
        if name in ("logps", "ref_logps", "kl_logps", "ref_kl_logps"):
            return rng.uniform(-60.0, -5.0, batch)
        if name == "label":
            return np.arange(batch) % 2 == 0
        if name == "score":  # Nash-MD's win probability
            return rng.uniform(0.0, 1.0, batch)
        if name == "length":
            return rng.integers(1, 30, batch).astype(np.float32)
        if name == "weight":
            return np.ones(batch, np.float32)
    if cls is types.ListLogps:
        shape = (batch, LIST_SIZE)
        if name in ("logps", "ref_logps"):
            return rng.uniform(-60.0, -5.0, shape)
        if name == "scores":
            return rng.permuted(np.tile(np.arange(LIST_SIZE, dtype=np.float64), (batch, 1)), axis=1)
        if name == "lengths":
            return rng.integers(1, 30, shape).astype(np.float32)
        if name == "mask":
            return np.ones(shape, np.float32)
        if name == "weight":
            return np.ones(batch, np.float32)
    if cls is types.RewardPair:
        if name in ("chosen", "rejected"):
            return rng.normal(0.0, 2.0, batch)
        if name == "margin":
            return rng.uniform(0.0, 1.0, batch)
        if name == "weight":
            return np.ones(batch, np.float32)
    if cls is types.RatedResponses:
        shape = (batch, ATTRIBUTES)
        if name in ("predicted", "target"):
            return rng.uniform(0.0, 4.0, shape)
        if name == "mask":
            return (rng.uniform(size=shape) > 0.2).astype(np.float32)
        if name == "weight":
            return np.ones(batch, np.float32)
    raise KeyError(f"synthetic: no generator for {cls.__name__}.{name}")


def make_inputs(spec: losses.LossSpec, batch: int = 5, seed: int = 0, dtype: Any = np.float32) -> Any:
    """Inputs for `spec` with every required and used field filled in."""
    rng = np.random.default_rng(seed)
    cls = spec.inputs
    # Fields without a default are mandatory for the container itself.
    wanted = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not None or f.name in spec.requires or f.name in spec.uses
    ]
    values: dict[str, Any] = {}
    for name in wanted:
        values[name] = _field_value(cls, name, batch, rng)
    if "score_chosen" in values:
        rejected = values.get("score_rejected")
        if rejected is None:
            rejected = values["score_rejected"] = rng.uniform(0.0, 1.0, batch)
        values["score_chosen"] = rejected + rng.uniform(0.1, 2.0, batch)
    return _build(cls, values, dtype)


def _build(cls: type, values: dict[str, Any], dtype: Any) -> Any:
    def convert(name: str, v: Any) -> Any:
        if v is None:
            return None
        v = np.asarray(v)
        if v.dtype == bool or name in ("label",):
            return jnp.asarray(v)
        if name.endswith("mask") or name.endswith("len") or name in ("length", "lengths", "weight"):
            return jnp.asarray(v, jnp.float32)
        return jnp.asarray(v, dtype)

    return cls(**{k: convert(k, v) for k, v in values.items()})


def replace(inputs: Any, **fields: Any) -> Any:
    """A copy of `inputs` with some fields replaced."""
    return dataclasses.replace(inputs, **fields)


def initial_state(spec: losses.LossSpec) -> Any:
    """The spec's initial state under default hyperparameters (None if stateless)."""
    return spec.init_state(**spec.hparam_defaults) if spec.stateful else None
