"""Resuming a workdir: this run's config against the checkpointed one, and every config kept.

    old = ckpt.metadata(step)["config"]
    notes = check_config(old, config, step)      # ConfigChangedError, or lines to print
    archive_config(workdir, config, step)        # <workdir>/configs/config-<step>-<time>.json

A rerun in the same workdir continues the run its checkpoint holds, so its config must be
the checkpointed one. Two exceptions:

- RUN_ONLY_KEYS may differ freely: they change how the run is carried out or reported
  (logging, evaluation, checkpoint cadence and export, device layout, tiling of the same
  arithmetic), not what it computes.
- total_steps may change when the steps already taken had the same learning rates under
  the new plan as under the old one (a constant schedule, or a resume at the end of a
  warmup counted in steps): the resumed run is then exactly a run planned with the new
  total_steps from the start. Otherwise a schedule that decays to total_steps (linear,
  cosine, or warmup given as a fraction) would jump at the resumed step; that is refused
  with both rates, unless checkpoint.allow_config_change=True, which re-plans the schedule
  over the new total_steps from the resumed step on (the jump is printed).

Any other difference is refused with the differing keys (key: old -> new), unless
checkpoint.allow_config_change=True, which resumes with the new values and prints them.
A key missing from an older checkpoint's config counts as its default.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import ml_collections
import numpy as np

from prefjax.losses import registry
from prefjax.train import config_lib, optim

# Keys that do not change the run's math (see the module docstring); "x.*" is every key under x.
RUN_ONLY_KEYS = (
    "log_every", "eval_every", "eval_batches", "data.eval_source", "data.eval_split",
    "checkpoint.*",
    "mesh.*", "sharding_rules", "distributed.*",
    "peak_flops",
    "logprob_chunk", "vocab_chunk", "logprob_tile_tokens",
    "model.attention_impl", "model.attention_block_size", "model.remat",
)
CONFIGS_DIR = "configs"


class ConfigChangedError(config_lib.ConfigError):
    """A rerun's config differs from the one its checkpoint was trained with."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _run_only(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RUN_ONLY_KEYS)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


_ABSENT = object()


def _with_loss_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    """The config's loss.* keys completed with its loss's paper defaults (config.loss holds only
    the hyperparameters a config sets), so that beta=0.1 set and beta left at 0.1 compare equal."""
    try:
        defaults = registry.get(flat.get("loss_name")).hparam_defaults
    except (KeyError, ValueError, TypeError):
        return flat  # an unknown (since removed) loss: compare what was written
    filled = {f"loss.{k}": list(v) if isinstance(v, tuple) else v for k, v in dict(defaults).items()}
    return {**filled, **flat}


def config_diff(old: Mapping[str, Any], new: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """{key: (old value, new value)} for every key that differs and changes the run's math
    (RUN_ONLY_KEYS left out); a key the old config lacks counts as its trainer default, a loss
    hyperparameter as its loss's default."""
    old_flat, new_flat = _with_loss_defaults(flatten(old)), _with_loss_defaults(flatten(_as_json(new)))
    defaults = flatten(_as_json(config_lib.trainer_config()))
    diff = {}
    for key in sorted(set(old_flat) | set(new_flat)):
        if _run_only(key):
            continue
        before = old_flat.get(key, defaults.get(key, _ABSENT))
        after = new_flat.get(key, defaults.get(key, _ABSENT))
        if not _same(before, after):
            diff[key] = (before, after)
    return diff


def _show(value: Any) -> str:
    return "<absent>" if value is _ABSENT else repr(value)


def schedule_jump(optimizer: ml_collections.ConfigDict, old_total: int, new_total: int,
                  step: int) -> tuple[bool, float, float]:
    """(whether the `step` updates already taken had other learning rates under the new plan,
    the old plan's rate at `step`, the new plan's rate at `step`)."""
    counts = np.arange(step + 1)
    old = np.asarray(optim.make_schedule(optimizer, old_total)(counts), np.float64)
    new = np.asarray(optim.make_schedule(optimizer, new_total)(counts), np.float64)
    past_differs = not np.allclose(old[:step], new[:step], rtol=1e-6, atol=0.0)
    return past_differs, float(old[step]), float(new[step])


def check_config(old: Mapping[str, Any], config: ml_collections.ConfigDict, step: int,
                 where: str = "the checkpoint") -> list[str]:
    """Raises ConfigChangedError when `config` may not resume the run checkpointed at `step`
    with config `old` (module docstring); else returns the lines to print about what changed."""
    allowed = bool(config.checkpoint.allow_config_change)
    diff = config_diff(old, config)
    total = diff.get("total_steps")
    jump = None
    if total is not None and all(isinstance(t, int) and not isinstance(t, bool) for t in total):
        jumps, before, after = schedule_jump(config.optimizer, total[0], total[1], step)
        del diff["total_steps"]
        if jumps:
            jump = (before, after)
    plan = f"{config.optimizer.schedule} schedule"
    if not allowed and diff:  # every difference at once, total_steps among them
        changes = "; ".join(f"{key}: {_show(a)} -> {_show(b)}" for key, (a, b) in config_diff(old, config).items())
        raise ConfigChangedError(
            f"{where} (step {step}) was trained with another config: {changes}. Rerun with the checkpointed "
            "values, use a fresh --workdir, or set --config.checkpoint.allow_config_change=True to resume with "
            "the new ones")
    if not allowed and jump is not None:
        raise ConfigChangedError(
            f"{where} (step {step}) was trained with total_steps={total[0]}; total_steps={total[1]} would make "
            f"the {plan} jump at step {step} from learning rate {jump[0]:.4g} to {jump[1]:.4g}. Keep "
            f"total_steps={total[0]}, use a fresh --workdir, or set --config.checkpoint.allow_config_change=True "
            f"to re-plan the schedule over {total[1]} steps")
    notes = []
    if total is not None and jump is None:
        notes.append(f"total_steps {total[0]} -> {total[1]}: the {step} steps taken had the same learning "
                     f"rates under the new plan; the {plan} continues over {total[1]} steps")
    elif total is not None:
        notes.append(f"total_steps {total[0]} -> {total[1]}: the {plan} is re-planned over {total[1]} steps; "
                     f"the learning rate jumps at step {step} from {jump[0]:.4g} (old plan) to {jump[1]:.4g}")
    if diff:
        changes = "; ".join(f"{key}: {_show(a)} -> {_show(b)}" for key, (a, b) in diff.items())
        notes.append(f"config changed on resume (checkpoint.allow_config_change=True): {changes}")
    return notes


def archive_config(workdir: Path, config: ml_collections.ConfigDict, step: int) -> Path:
    """Writes <workdir>/config.json (this run's config) and keeps a copy that no later run
    overwrites: <workdir>/configs/config-<step>-<UTC time>.json, `step` the one it starts from."""
    text = config.to_json_best_effort(indent=2) + "\n"
    (workdir / "config.json").write_text(text)
    folder = workdir / CONFIGS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = folder / f"config-{step}-{stamp}.json"
    suffix = 1
    while path.exists():  # two starts in the same second (a crash loop) keep both
        path = folder / f"config-{step}-{stamp}-{suffix}.json"
        suffix += 1
    path.write_text(text)
    return path
