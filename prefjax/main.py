"""prefjax's main job: python -m prefjax.main --config=configs/<experiment>.py --workdir=DIR.

A config with job="train" runs the sharded preference trainer (`prefjax.train`;
e.g. configs/tiny_dpo.py); rerunning the same command in the same workdir resumes.
Multi-host runs initialise jax.distributed from config.distributed (coordinator
address, process count and id) or, on TPU pods and SLURM, from the environment.
A config with job="online" runs the same trainer on batches it samples from the live
policy (`prefjax.online`; e.g. configs/online_dpo.py). The quick-start config
(job="quickstart") runs the synthetic LM pipeline (`prefjax.quickstart.pipeline`); any
other job is an error naming these three.
Override any config key on the command line, e.g.

    python -m prefjax.main --config=configs/tiny_dpo.py --workdir=/tmp/t \\
        --config.loss_name=ipo --config.loss.beta=0.5 --config.data.max_prompt_len=None

The config is strict: a key that does not exist, in the config file (train job: any key
trainer_config() lacks) or on the command line, is an error with a did-you-mean;
configs/README.md lists every trainer key. `--config.KEY=None` sets a key that allows None;
`--config.loss.NAME=VALUE` sets any hyperparameter of the chosen loss; switching the loss
(`--config.loss_name=simpo` on a file written for DPO) resets config.loss to the new loss's
paper defaults and the reference to what it needs (the rule: prefjax.train.overrides).

A user's mistake (config, data, checkpoint, tokenizer, a missing file, a loss that turned
non-finite) ends the run with one or two lines on stderr naming what is wrong and exit
status 1; `--verbose` adds the traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import re
import sys
import traceback
from typing import NoReturn, Optional, Sequence

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

JOBS = ("train", "online", "quickstart")
# The quick start's schema: the keys its job reads are those this file sets.
QUICKSTART_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "quickstart.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/quickstart.py (or configs/quickstart.py:LOSS_NAME).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl and summary.json.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On a user error (config, data, files) also print the traceback.")

# The command line as split by prefjax.train.overrides in _parse_flags (main applies the rest).
_command_line = None


def user_errors() -> tuple[type, ...]:
    """The exceptions that are the user's to fix: shown as their message alone (module docstring)."""
    # pylint: disable=import-outside-toplevel
    from prefjax.data.hub import HubDatasetError
    from prefjax.data.pipeline import PipelineEmptyError
    from prefjax.data.records import DataError
    from prefjax.data.streams import DataKindError
    from prefjax.hub_download import HubError
    from prefjax.models.hf_checkpoint import CheckpointError
    from prefjax.models.hf_config import HFConfigError
    from prefjax.models.safetensors_format import SafetensorsError
    from prefjax.models.tokenizer import TokenizerError
    from prefjax.train import checkpoint
    from prefjax.train.config_lib import ConfigError
    from prefjax.train.loop import NonFiniteLossError
    from prefjax.train.workdir_lock import WorkdirLockLostError
    return (ConfigError, DataError, CheckpointError, HFConfigError, SafetensorsError, TokenizerError,
            HubError, HubDatasetError, DataKindError, PipelineEmptyError, FileNotFoundError, NonFiniteLossError,
            WorkdirLockLostError, *checkpoint.USER_ERRORS)


def _exit_with(message: str, verbose: bool) -> NoReturn:
    """The one way a user's mistake ends the program: 'error: ...' on stderr, exit status 1."""
    if verbose:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


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


def _unknown_keys_message(argv: Sequence[str]) -> Optional[str]:
    """Names the overrides of keys the config lacks, each with a did-you-mean.

    None when the parse error was something else (the caller re-raises it).
    """
    from prefjax.train import config_lib  # pylint: disable=import-outside-toplevel

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
    valid = list(config_lib.leaf_paths(config))
    bad = [m.group(1) for m in overrides if m and m.group(1) not in valid and not _is_section(config, m.group(1))]
    if not bad:
        return None
    # configs/README.md lists the trainer's keys only; another job's keys are those its file sets
    schema_name = "" if config.get("job") in ("train", "online") else argument.partition(":")[0]
    return config_lib.unknown_keys_message(bad, valid, "command line", schema_name)


def _is_section(config: ml_collections.ConfigDict, path: str) -> bool:
    node = config
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, ml_collections.ConfigDict)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, after prefjax.train.overrides took out what config_flags cannot parse;
    a mistake on the command line ends the program in one or two lines."""
    global _command_line  # pylint: disable=global-statement
    from prefjax.train import config_lib, overrides  # pylint: disable=import-outside-toplevel

    verbose = any(re.match(r"^--?verbose(=(true|1))?$", a, re.I) for a in argv)
    try:
        _command_line = overrides.split_argv(argv)
    except config_lib.ConfigError as e:
        _exit_with(str(e), verbose)
    argument = _config_argument(argv)
    if argument and not os.path.isfile(argument.partition(":")[0]):
        _exit_with(f"--config={argument}: no such config file", verbose)
    # config_flags reads its overrides from sys.argv itself: it must see the split command line.
    sys.argv[:] = _command_line.argv
    try:
        return flags.FLAGS(_command_line.argv)
    except (AttributeError, KeyError):  # ml_collections' bare error for a key the config lacks
        message = _unknown_keys_message(_command_line.argv)
        if message is None:
            raise
        _exit_with(message, verbose)
    except flags.Error as e:  # absl's: a value of the wrong type, or the config file raised
        _exit_with(_flag_error_message(str(e), verbose), verbose)


def _flag_error_message(text: str, verbose: bool) -> str:
    """absl's message, less the config file's traceback that config_flags pastes into it (shown with
    --verbose): its last line names the exception."""
    if "Error whilst parsing config file" not in text or verbose:
        return text
    head = text.split(":", 2)[:2]
    return f"{':'.join(head)}: {text.strip().splitlines()[-1]}"


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("pass --config=configs/quickstart.py and --workdir=DIR")
    try:
        _run(_CONFIG.value, config_flags.get_config_filename(flags.FLAGS["config"]))
    except Exception as e:  # pylint: disable=broad-except
        if not isinstance(e, user_errors()):
            raise
        _exit_with(str(e), _VERBOSE.value)


def _run(config: ml_collections.ConfigDict, source: str) -> None:
    """Checks the config (keys, command-line extras) and runs its job."""
    # On a CPU-only machine jax logs its failed TPU probe at INFO, which absl would print.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from prefjax.train import config_lib, overrides  # pylint: disable=import-outside-toplevel

    job = config.get("job", None)
    if job not in JOBS:
        raise config_lib.ConfigError(f"{source}: field job={job!r}; set config.job to one of {list(JOBS)} "
                                     "(prefjax.train.config_lib.trainer_config() starts a training config)")
    trainer = job in ("train", "online")
    if trainer:
        config_lib.check_keys(config, source=source)
    else:
        _check_quickstart_keys(config, source)
    command_line = _command_line or overrides.CommandLine(argv=[])
    notes = overrides.apply(config, command_line, overridden=config_flags.get_override_values(flags.FLAGS["config"]),
                            nullable=config_lib.nullable_keys() if trainer else None)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if trainer:
        config_lib.check_data_files(config)  # before the model is built: a typo in a path fails fast
        if not flags.FLAGS["verbosity"].present:
            # orbax logs every file it renames at INFO; the trainer's own progress line suffices.
            absl_logging.set_verbosity(absl_logging.WARNING)
        if not _VERBOSE.value:
            # The run's notes (the row format detected, a length warning) read as plain lines; absl's
            # "W1207 11:55:50.028161 1404... file.py:501]" prefix is for debugging (--verbose).
            absl_logging.get_absl_handler().setFormatter(logging.Formatter("%(message)s"))
        _init_distributed(config)
        if job == "online":
            from prefjax.online import job as online_job  # pylint: disable=import-outside-toplevel

            online_job.run(config, _WORKDIR.value)
            return
        from prefjax import train  # pylint: disable=import-outside-toplevel

        train.run(config, _WORKDIR.value)
        return
    from prefjax.quickstart import pipeline  # pylint: disable=import-outside-toplevel
    try:
        pipeline.run(config, _WORKDIR.value)
    except (ValueError, KeyError) as e:  # the quick start's own checks (task, reuse, loss data kind)
        if isinstance(e, KeyError):
            raise config_lib.ConfigError(e.args[0] if e.args else str(e)) from e
        raise config_lib.ConfigError(str(e)) from e


def _check_quickstart_keys(config: ml_collections.ConfigDict, source: str) -> None:
    """A quick-start config file of one's own: its keys must be those configs/quickstart.py sets (the
    quick start's schema; a typo in that file itself is not caught, since it is the schema)."""
    from prefjax.train import config_lib  # pylint: disable=import-outside-toplevel

    schema_file = QUICKSTART_CONFIG
    if not schema_file.is_file() or schema_file.resolve() == pathlib.Path(source.partition(":")[0]).resolve():
        return
    config_lib.check_keys(config, source=source, schema=_load_config(str(schema_file)),
                          schema_name="configs/quickstart.py")


def _init_distributed(config: ml_collections.ConfigDict) -> None:
    """jax's multi-controller runtime: from the config's coordinator settings, or on a TPU pod
    from its environment. A single process on one host needs neither.

    When a process dies, jax's coordination service (run by process 0) notices its missing
    heartbeats within `distributed.heartbeat_timeout_seconds` and ends every other process with a
    fatal log naming it ("Task 1 heartbeat timeout"). If process 0 itself dies, the others lose
    the service ("Either the leader task was preempted/died") as soon as its connection closes, or
    within the same timeout if its host vanished. The shutdown timeout stays jax's 300 s: it is
    how long a finished process waits at exit for the others, and one that gave up sooner would
    end a process 0 still writing the final export.
    """
    d = config.distributed
    heartbeat = _heartbeat_timeout(d)
    if d.coordinator_address:
        jax.distributed.initialize(coordinator_address=d.coordinator_address,
                                   num_processes=d.num_processes or None,
                                   process_id=None if d.process_id < 0 else d.process_id,
                                   heartbeat_timeout_seconds=heartbeat)
    elif any(os.environ.get(var) for var in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")) or (
            os.environ.get("SLURM_NTASKS", "1") not in ("", "1") and os.environ.get("SLURM_STEP_NODELIST")):
        # TPU pods and SLURM clusters describe themselves
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)


def _heartbeat_timeout(distributed: ml_collections.ConfigDict) -> int:
    """config.distributed.heartbeat_timeout_seconds, checked: jax takes whole seconds, at least 1."""
    from prefjax.train import config_lib  # pylint: disable=import-outside-toplevel

    value = distributed.heartbeat_timeout_seconds
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise config_lib.ConfigError(
            f"config.distributed.heartbeat_timeout_seconds={value!r}: must be a whole number of seconds >= 1 "
            "(how long a process may go silent before the others stop; default 20)")
    return value


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
