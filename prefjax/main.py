"""prefjax's main job: python -m prefjax.main --config=configs/<experiment>.py --workdir=DIR.

A config with job="train" runs the sharded preference trainer (`prefjax.train`;
e.g. configs/tiny_dpo.py); rerunning the same command in the same workdir resumes.
Multi-host runs initialise jax.distributed from config.distributed (coordinator
address, process count and id) or, on TPU pods and SLURM, from the environment.
The quick-start config (job="quickstart") runs the synthetic LM pipeline
(`prefjax.quickstart.pipeline`); any other job is an error naming these two.
Override any config key on the command line, e.g.

    python -m prefjax.main --config=configs/quickstart.py --workdir=/tmp/q \\
        --config.loss_name=ipo --config.loss.beta=0.5

The config is locked: a key that does not exist is an error that lists the valid keys
(ml_collections itself raises a bare AttributeError), and a config the job cannot run
(unknown loss, a hyperparameter the loss lacks) is an error naming what is wrong.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from typing import Optional, Sequence

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

JOBS = ("train", "quickstart")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/quickstart.py (or configs/quickstart.py:LOSS_NAME).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl and summary.json.")


def _config_argument(argv: Sequence[str]) -> Optional[str]:
    """The value of --config in argv ("path" or "path:arg"), or None."""
    for i, arg in enumerate(argv):
        match = re.match(r"^--?config(=|$)(.*)", arg)
        if match:
            return match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _load_config(argument: str) -> ml_collections.ConfigDict:
    """Builds the config the way config_flags does: get_config() or get_config(arg)."""
    path, _, arg = argument.partition(":")
    module_spec = importlib.util.spec_from_file_location("_prefjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def _has_key(config: ml_collections.ConfigDict, path: str) -> bool:
    node = config
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def _unknown_keys_message(argv: Sequence[str]) -> Optional[str]:
    """Explains overrides of keys the locked config lacks, listing the valid keys.

    None when the parse error was something else (the caller re-raises it).
    """
    argument = _config_argument(argv)
    if argument is None:
        return None
    try:
        config = _load_config(argument)
    except KeyError as e:  # the config argument names no registered loss (":nope")
        return f"--config={argument}: {e.args[0]}"
    except Exception:  # noqa: BLE001 -- the caller re-raises the original error instead
        return None
    overrides = [re.match(r"^--?(?:no)?config\.([^=\s]+)", a) for a in argv]
    bad = [m.group(1) for m in overrides if m and not _has_key(config, m.group(1))]
    if not bad:
        return None
    message = (
        f"unknown config key(s) {bad} for --config={argument}; "
        f"valid keys are: {', '.join(_leaf_keys(config))}"
    )
    if any(key.startswith("loss.") for key in bad):
        message += (
            ". config.loss holds only the hyperparameters the config file put there; to get "
            "every hyperparameter of a loss as a key, name it in the config argument, "
            "e.g. --config=configs/quickstart.py:simpo"
        )
    return message


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with ml_collections' bare AttributeError made a clear error."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        message = _unknown_keys_message(argv)
        if message is None:
            raise
        print(f"FATAL Flags parsing error: {message}", file=sys.stderr)
        sys.exit(1)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("pass --config=configs/quickstart.py and --workdir=DIR")
    # On a CPU-only machine jax logs its failed TPU probe at INFO, which absl would print.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    config = _CONFIG.value
    job = config.get("job", None)
    if job not in JOBS:
        source = config_flags.get_config_filename(flags.FLAGS["config"])
        sys.exit(f"error: {source}: field job={job!r}; set config.job to one of {list(JOBS)} "
                 "(prefjax.train.config_lib.trainer_config() starts a training config)")
    if job == "train":
        if not flags.FLAGS["verbosity"].present:
            # orbax logs every file it renames at INFO; the trainer's own progress line suffices.
            absl_logging.set_verbosity(absl_logging.WARNING)
        _init_distributed(config)
        from prefjax import train  # pylint: disable=import-outside-toplevel
        from prefjax.train import config_lib  # pylint: disable=import-outside-toplevel
        try:
            train.run(config, _WORKDIR.value)
        except (config_lib.ConfigError, train.NonFiniteLossError) as e:
            sys.exit(f"error: {e}")
        return
    from prefjax.quickstart import pipeline  # pylint: disable=import-outside-toplevel
    try:
        pipeline.run(config, _WORKDIR.value)
    except (ValueError, KeyError) as e:
        sys.exit(f"error: {e}")


def _init_distributed(config: ml_collections.ConfigDict) -> None:
    """jax's multi-controller runtime: from the config's coordinator settings, or on a TPU pod
    from its environment. A single process on one host needs neither."""
    d = config.distributed
    if d.coordinator_address:
        jax.distributed.initialize(coordinator_address=d.coordinator_address,
                                   num_processes=d.num_processes or None,
                                   process_id=None if d.process_id < 0 else d.process_id)
    elif any(os.environ.get(var) for var in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")) or (
            os.environ.get("SLURM_NTASKS", "1") not in ("", "1") and os.environ.get("SLURM_STEP_NODELIST")):
        jax.distributed.initialize()  # TPU pods and SLURM clusters describe themselves


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
