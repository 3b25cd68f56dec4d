"""The optimizer: an optax chain and its learning-rate schedule, built from a config section.

    tx, schedule = make_optimizer(config.optimizer, total_steps=config.total_steps)
    shardings = opt_state_shardings(tx, abstract_params, param_shardings, mesh)
    opt_state = init_opt_state(tx, params, shardings)      # born sharded, counts replicated

Every optimizer is the same chain, so the config fields mean the same thing
whatever `name` is:

    clip_by_global_norm(grad_clip_norm)       (when grad_clip_norm > 0)
    -> direction of `name`                    (adam moments, lion sign, ...)
    -> add_decayed_weights(weight_decay, mask) (decoupled, AdamW-style)
    -> scale_by_learning_rate(schedule)

so a step changes a parameter p by -lr(t) * (direction + weight_decay * p).

Optimizer state must be placed like the parameters it shadows: `jax.jit(tx.init)`
alone leaves scalar counts on one device, which breaks multi-process orbax saves
and makes the first train step recompile. The shardings
here put param-shaped state leaves on their parameter's sharding and every other
leaf (counts, factored statistics) replicated on the mesh.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Params = Any
PyTree = Any

OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor")
SCHEDULES = ("constant", "linear", "cosine")
WEIGHT_DECAY_MASKS = ("no_norms_or_biases", "all", "none")


def default_config() -> ml_collections.ConfigDict:
    """The optimizer section with every field and its default.

    Fields:
      name: one of OPTIMIZERS. "adamw" and "adam" share the Adam moments (b1, b2,
        eps); "adam" refuses weight_decay > 0 (use "adamw" for decay). "sgd" uses
        `momentum` (0 = plain SGD). "lion" uses b1, b2 (sign updates: give it a
        3-10x smaller learning rate than AdamW). "adafactor" uses factored second
        moments (optax defaults: decay_rate 0.8, factored for dims >= 128,
        epsilon 1e-30, update clipping at block RMS 1), no momentum and an
        absolute learning rate (no parameter-scale multiplication); b1, b2, eps
        are unused.
      learning_rate: peak learning rate, reached at the end of warmup.
      schedule: one of SCHEDULES, after a linear warmup from 0: "constant" stays
        at the peak, "linear" and "cosine" decay to
        min_learning_rate_ratio * learning_rate at step total_steps.
      warmup_steps: warmup length; a number in (0, 1) is a fraction of
        total_steps (rounded to the nearest step), otherwise a whole number of
        steps (0 = no warmup). The rate at step 0 of a warmup is 0.
      min_learning_rate_ratio: final rate / peak rate for "linear" and "cosine".
      b1, b2, eps: Adam's moment decays and denominator epsilon (b1, b2 also Lion's).
      weight_decay: decoupled decay coefficient (the update gains
        -lr * weight_decay * p), applied where weight_decay_mask says.
      weight_decay_mask: which parameters decay (see `weight_decay_mask`):
        "no_norms_or_biases" (the matmul kernels only), "all", or "none".
      grad_clip_norm: clip gradients to this global L2 norm before anything
        else; 0 or None turns clipping off.
      momentum: SGD's momentum (heavy ball); 0 = none.
    """
    return ml_collections.ConfigDict({
        "name": "adamw",
        "learning_rate": 1e-6,
        "schedule": "cosine",
        "warmup_steps": 0.1,
        "min_learning_rate_ratio": 0.0,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "weight_decay_mask": "no_norms_or_biases",
        "grad_clip_norm": 1.0,
        "momentum": 0.9,
    })


# --------------------------------------------------------------------------- config checks

def _fields(config: Union[ml_collections.ConfigDict, Mapping[str, Any]]) -> dict[str, Any]:
    """The config's fields over the defaults; unknown fields are an error, not ignored."""
    given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    defaults = default_config().to_dict()
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"optimizer config: unknown field(s) {unknown}; valid fields are {sorted(defaults)}")
    return {**defaults, **given}


def _check(ok: bool, field: str, value: Any, requirement: str) -> None:
    if not ok:
        raise ValueError(f"optimizer config field {field!r} = {value!r}: {requirement}")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, field, value, f"must be one of {list(choices)}")


def resolve_warmup_steps(warmup_steps: Union[int, float, None], total_steps: int) -> int:
    """Warmup length in steps: a value in (0, 1) is a fraction of total_steps."""
    if warmup_steps is None:
        return 0
    is_number = isinstance(warmup_steps, (int, float)) and not isinstance(warmup_steps, bool)
    _check(is_number and warmup_steps >= 0, "warmup_steps", warmup_steps, "must be a number >= 0")
    value = float(warmup_steps)
    if 0 < value < 1:
        steps = int(round(value * total_steps))
    else:
        _check(value == int(value), "warmup_steps", warmup_steps,
               "must be a fraction in (0, 1) or a whole number of steps")
        steps = int(value)
    _check(steps <= total_steps, "warmup_steps", warmup_steps,
           f"gives {steps} warmup steps, more than total_steps={total_steps}")
    return steps


# --------------------------------------------------------------------------- schedule

def make_schedule(config: Union[ml_collections.ConfigDict, Mapping[str, Any]], total_steps: int,
                  ) -> optax.Schedule:
    """The learning rate as a function of the optimizer's step count (see default_config)."""
    c = _fields(config)
    _check(isinstance(total_steps, int) and total_steps >= 1, "total_steps", total_steps,
           "must be an int >= 1")
    _check_choice("schedule", c["schedule"], SCHEDULES)
    _check(c["learning_rate"] >= 0, "learning_rate", c["learning_rate"], "must be >= 0")
    _check(0 <= c["min_learning_rate_ratio"] <= 1, "min_learning_rate_ratio", c["min_learning_rate_ratio"],
           "must be in [0, 1]")
    peak = float(c["learning_rate"])
    end = peak * float(c["min_learning_rate_ratio"])
    warmup = resolve_warmup_steps(c["warmup_steps"], total_steps)
    decay_steps = max(total_steps - warmup, 1)
    kind = c["schedule"]

    def schedule(count: Any) -> jax.Array:
        count = jnp.asarray(count, jnp.float32)
        warm = peak * count / max(warmup, 1)
        t = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
        if kind == "constant":
            after = jnp.full_like(t, peak)
        elif kind == "linear":
            after = peak + (end - peak) * t
        else:
            after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        return jnp.where(count < warmup, warm, after)

    return schedule


# --------------------------------------------------------------------------- weight-decay mask

def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def decays(path: tuple[Any, ...], leaf: Any) -> bool:
    """Whether "no_norms_or_biases" decays this parameter.

    Decayed: the matmul kernels (attention q/k/v/o, MLP gate/up/down, an untied
    lm_head, LoRA factors). Not decayed: anything of rank < 2, biases (any name
    ending in "bias"; Qwen2's q/k/v biases are [heads, head_dim], so rank alone
    does not tell), norm scales (any path component containing "norm"), and the
    input embedding (a lookup table whose rows get sparse gradients; when tied
    it is also the unembedding and stays undecayed).
    """
    names = [_key_name(k) for k in path]
    last = names[-1] if names else ""
    if len(getattr(leaf, "shape", ())) < 2 or last.endswith("bias") or last == "embedding":
        return False
    return not any("norm" in name for name in names)


def weight_decay_mask(kind: str) -> Callable[[Params], PyTree]:
    """The mask for `kind` as a function of params (optax calls it at init and update)."""
    _check_choice("weight_decay_mask", kind, WEIGHT_DECAY_MASKS)
    if kind == "all":
        return lambda params: jax.tree.map(lambda _: True, params)
    if kind == "none":
        return lambda params: jax.tree.map(lambda _: False, params)
    return lambda params: jax.tree_util.tree_map_with_path(decays, params)


# --------------------------------------------------------------------------- optimizer

def _direction(name: str, c: dict[str, Any]) -> optax.GradientTransformation:
    """The learning-rate-free update direction of each optimizer."""
    if name in ("adamw", "adam"):
        return optax.scale_by_adam(b1=c["b1"], b2=c["b2"], eps=c["eps"])
    if name == "sgd":
        return optax.trace(decay=c["momentum"]) if c["momentum"] else optax.identity()
    if name == "lion":
        return optax.scale_by_lion(b1=c["b1"], b2=c["b2"])
    return optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0))


def make_optimizer(config: Union[ml_collections.ConfigDict, Mapping[str, Any]], total_steps: int,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, learning-rate schedule) for the optimizer config section.

    `config` may leave fields out (they take default_config's values); unknown
    fields, unknown names and out-of-range values raise ValueError naming the field.
    """
    c = _fields(config)
    name = c["name"]
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer config field 'name' = {name!r}: unknown optimizer; valid names are "
                         f"{list(OPTIMIZERS)}")
    for field in ("b1", "b2", "momentum"):
        _check(0 <= c[field] < 1, field, c[field], "must be in [0, 1)")
    _check(c["eps"] > 0, "eps", c["eps"], "must be > 0")
    _check(c["weight_decay"] >= 0, "weight_decay", c["weight_decay"], "must be >= 0")
    _check(not (name == "adam" and c["weight_decay"] > 0), "weight_decay", c["weight_decay"],
           "'adam' has no weight decay; use name='adamw'")
    clip = c["grad_clip_norm"]
    _check(clip is None or clip >= 0, "grad_clip_norm", clip, "must be >= 0 (0 or None = off)")
    mask = weight_decay_mask(c["weight_decay_mask"])
    schedule = make_schedule(c, total_steps)

    parts = []
    if clip:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(_direction(name, c))
    if c["weight_decay"] > 0 and c["weight_decay_mask"] != "none":
        parts.append(optax.add_decayed_weights(c["weight_decay"], mask=mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule


# --------------------------------------------------------------------------- state shardings

def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params: Params,
                        param_shardings: Params, mesh: Mesh) -> PyTree:
    """A NamedSharding for every leaf of optimizer.init(params).

    A state leaf whose path ends with a parameter's path (mu/nu/trace trees
    mirror the params) and has that parameter's shape gets the parameter's
    sharding; everything else (step counts, Adafactor's factored row/column
    statistics) is replicated over the whole mesh.
    """
    abstract_state = jax.eval_shape(optimizer.init, abstract_params)
    by_path: dict[tuple, tuple[tuple[int, ...], NamedSharding]] = {}
    params_flat, params_def = jax.tree_util.tree_flatten_with_path(abstract_params)
    shardings_flat = params_def.flatten_up_to(param_shardings)
    for (path, leaf), sharding in zip(params_flat, shardings_flat):
        by_path[tuple(path)] = (tuple(leaf.shape), sharding)
    lengths = sorted({len(p) for p in by_path}, reverse=True)
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(path: tuple, leaf: Any) -> NamedSharding:
        for n in lengths:  # the longest matching parameter path wins
            if n <= len(path):
                hit = by_path.get(tuple(path[len(path) - n:]))
                if hit is not None and hit[0] == tuple(leaf.shape):
                    return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(place, abstract_state)


def init_opt_state(optimizer: optax.GradientTransformation, params: Params, shardings: PyTree) -> PyTree:
    """optimizer.init(params), computed under jit directly into `shardings`.

    `shardings` is opt_state_shardings(...)'s result, or simply the parameter
    shardings (a tree shaped like params), from which the state's are derived.
    """
    if jax.tree.structure(shardings) == jax.tree.structure(params):
        mesh = jax.tree.leaves(shardings)[0].mesh
        shardings = opt_state_shardings(optimizer, params, shardings, mesh)
    return jax.jit(optimizer.init, out_shardings=shardings)(params)
