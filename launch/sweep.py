"""Sweeps: a config file's `sweep(add)` expanded into prefjax runs, one workdir per run.

A config file may define

    def sweep(add):
        for loss_name in ("dpo", "ipo"):
            for beta in (0.1, 0.5):
                add(loss_name=loss_name, loss__beta=beta)     # or **{"loss.beta": beta}

Each `add(**overrides)` is one run: `python -m prefjax.main --config=FILE --workdir=BASE/NAME
--config.loss_name=dpo --config.loss.beta=0.1`, where NAME is made of the overrides
(`loss_name=dpo,loss.beta=0.1`). A double underscore in a keyword stands for a dot (nested
key). Every key must already exist in the file's config (it is locked), and a value must
fit the key's type: otherwise the error names the file and the line of the `add` call.

    python -m launch.sweep --config=configs/sweep_tiny_dpo.py --workdir=/tmp/sweep
    python -m launch.sweep ... --only=loss_name=dpo          # the runs with that override
    python -m launch.sweep ... --dry_run                     # print the commands
    python -m launch.sweep ... -- --config.total_steps=5     # arguments for every run
    python -m launch.sweep ... --mode=tpu --tpu_name=pod --tpu_zone=us-central2-b --tpu_bucket=gs://b

`--mode=local` (default) runs them one after another on this machine and skips finished
runs (summary.json present, not preempted, at the expected total_steps), so rerunning a
sweep after a crash or an edit only runs what is missing. It writes BASE/sweep.json (the
runs and their overrides) for `launch.collect` and prints the collector's table at the end.
`--mode=tpu` runs them one after another on a TPU pod through launch.tpu_pod (the checkout
is shipped once); the workers skip finished runs themselves, which needs the workdirs in
the bucket (`--tpu_bucket`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

from launch import run_status, tpu_pod
from launch.shell import Command, Executor

MANIFEST = "sweep.json"


class SweepError(ValueError):
    """A sweep that cannot be expanded; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One `add(...)` call: ordered (key, value) overrides and where it was made."""

    overrides: tuple[tuple[str, Any], ...]
    line: int

    @property
    def name(self) -> str:
        return run_name(self.overrides)

    def flags(self) -> list[str]:
        return [f"--config.{key}={format_value(value)}" for key, value in self.overrides]

    def value_of(self, key: str) -> str | None:
        return next((format_value(v) for k, v in self.overrides if k == key), None)


def format_value(value: Any) -> str:
    """A value as ml_collections' command-line parser reads it back."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return str(value)


def run_name(overrides: Sequence[tuple[str, Any]]) -> str:
    """`key=value,key=value`, with characters that paths or shells mangle replaced by `_`."""
    text = ",".join(f"{key}={format_value(value)}" for key, value in overrides) or "base"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def load_module(path: str) -> ModuleType:
    """A config file as a module (the way prefjax.main loads it)."""
    if not Path(path).is_file():
        raise SweepError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location("_prefjax_sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """config[key] = value for a dotted key that must exist.

    Raises KeyError with the reason (the key is missing, or names a group) and TypeError
    when the value does not fit the field's type.
    """
    node, done = config, []
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = f"config.{'.'.join(done)}" if done else "the config"
            has = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise KeyError(f"the config has no key {key!r} ({where} has: {', '.join(has) or 'no keys'}); "
                           "a swept key must exist in get_config(), which is locked on the command line")
        done.append(part)
        parent, node = node, node[part]
    if isinstance(node, ml_collections.ConfigDict):
        raise KeyError(f"{key!r} is a group of keys; sweep its keys instead (e.g. {key.replace('.', '__')}__NAME=...)")
    parent[done[-1]] = value


def _check_loss_hparam(loss_name: str, key: str, value: Any) -> None:
    """KeyError unless `key` ("loss.NAME") names a hyperparameter of loss `loss_name`, ValueError unless
    `value` is in its domain (the trainer's own checks, prefjax.train.config_lib: a did-you-mean, the
    allowed range and why)."""
    from prefjax.train import config_lib  # pylint: disable=import-outside-toplevel

    name = key[len("loss."):]
    try:
        config_lib.check_loss_name(loss_name)
        config_lib.check_loss_hparams(loss_name, [name], source=f"no key {key!r}")
    except config_lib.ConfigError as err:
        raise KeyError(str(err)) from None
    try:
        config_lib.check_loss_hparams(loss_name, {name: value}, source="loss")
    except config_lib.ConfigError as err:
        raise ValueError(str(err)) from None


def expand(config_arg: str) -> tuple[ml_collections.ConfigDict, list[Run]]:
    """The config (`path` or `path:arg`) and the runs its `sweep(add)` adds, checked."""
    path, _, arg = config_arg.partition(":")
    module = load_module(path)
    if not callable(getattr(module, "sweep", None)):
        raise SweepError(f"{path}: defines no sweep(add) function")
    config = module.get_config(arg) if arg else module.get_config()
    runs: list[Run] = []

    def add(**overrides: Any) -> None:
        caller = sys._getframe(1)  # pylint: disable=protected-access -- the add() line, for errors
        line = caller.f_lineno if caller.f_code.co_filename == module.__file__ else 0
        where = f"{path}:{line}" if line else path
        keys = [(key.replace("__", "."), value) for key, value in overrides.items()]
        trial = copy.deepcopy(config)  # keeps each field's type, which assignment checks
        loss_name = dict(keys).get("loss_name", config.get("loss_name"))
        for key, value in keys:
            try:
                if key.startswith("loss.") and loss_name is not None:
                    # As on prefjax.main's command line: any hyperparameter of the run's loss.
                    _check_loss_hparam(loss_name, key, value)
                    trial.loss[key[len("loss."):]] = value
                    continue
                _set(trial, key, value)
            except KeyError as err:
                raise SweepError(f"{where}: add({key}=...): {err.args[0]}") from None
            except TypeError as err:
                raise SweepError(f"{where}: add({key}={value!r}): {err}") from None
            except ValueError as err:  # a loss hyperparameter outside its domain; the message names it
                raise SweepError(f"{where}: {err}") from None
        runs.append(Run(tuple(keys), line))

    module.sweep(add)
    if not runs:
        raise SweepError(f"{path}: sweep(add) added no runs")
    seen: dict[str, Run] = {}
    for run in runs:
        if run.name in seen:
            raise SweepError(f"{path}:{run.line}: run {run.name!r} repeats the run added at line "
                             f"{seen[run.name].line}")
        seen[run.name] = run
    return config, runs


def select(runs: Sequence[Run], only: Sequence[str]) -> list[Run]:
    """The runs whose overrides include every `key=value` in `only`."""
    wanted = []
    for item in only:
        key, sep, value = item.partition("=")
        if not sep:
            raise SweepError(f"--only={item!r}: expected key=value")
        wanted.append((key.replace("__", "."), value))
    return [r for r in runs if all(r.value_of(k) == v for k, v in wanted)]


def expected_total_steps(config: ml_collections.ConfigDict, run: Run, extra_args: Sequence[str]) -> int:
    """total_steps the run will train for: the run's override, else the extra args', else the file's."""
    total = config.total_steps
    for arg in extra_args:
        match = re.fullmatch(r"--config\.total_steps=(\d+)", arg)
        if match:
            total = int(match.group(1))
    override = run.value_of("total_steps")
    return int(override) if override is not None else int(total)


def main_args(config_arg: str, run: Run, extra_args: Sequence[str]) -> list[str]:
    """prefjax.main arguments of a run, without --workdir; the run's overrides come last (they win)."""
    return [f"--config={config_arg}", *extra_args, *run.flags()]


def write_manifest(base: Path, config_arg: str, runs: Sequence[Run], extra_args: Sequence[str]) -> None:
    base.mkdir(parents=True, exist_ok=True)
    manifest = {"config": config_arg, "extra_args": list(extra_args),
                    "runs": [{"name": r.name, "overrides": {k: v for k, v in r.overrides}} for r in runs]}
    (base / MANIFEST).write_text(json.dumps(manifest, indent=2, default=repr) + "\n")


def run_local(config_arg: str, config: ml_collections.ConfigDict, runs: Sequence[Run], base: Path,
              extra_args: Sequence[str], executor: Executor, python: str = sys.executable) -> list[str]:
    """Runs the unfinished runs one after another; returns the names of runs that failed."""
    failed = []
    for i, run in enumerate(runs, start=1):
        workdir = base / run.name
        total = expected_total_steps(config, run, extra_args)
        if run_status.is_finished(workdir, total):
            executor.note(f"[{i}/{len(runs)}] {run.name}: finished ({total} steps), skipped")
            continue
        executor.note(f"[{i}/{len(runs)}] {run.name}")
        command = Command([python, "-m", "prefjax.main", *main_args(config_arg, run, extra_args),
                           f"--workdir={workdir}"])
        if executor.run(command, check=False) != 0:
            failed.append(run.name)
    return failed


def run_tpu(config_arg: str, config: ml_collections.ConfigDict, runs: Sequence[Run], base: str,
            extra_args: Sequence[str], executor: Executor, pod: tpu_pod.TpuPod, **run_options: Any) -> list[str]:
    """Runs them one after another on a pod; the checkout is packed and copied once.

    A failed pack or copy raises CalledProcessError; a failed run is reported and the next one starts.
    """
    failed = []
    for i, run in enumerate(runs):
        total = expected_total_steps(config, run, extra_args)
        *ship, start = pod.run(main_args(config_arg, run, extra_args), workdir=f"{base.rstrip('/')}/{run.name}",
                               total_steps=total if run_options.get("bucket") else None, foreground=True,
                               **run_options)
        if i == 0:
            for command in ship:
                executor.run(command)
        executor.note(f"[{i + 1}/{len(runs)}] {run.name}")
        if executor.run(start, check=False) != 0:
            failed.append(run.name)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="python -m launch.sweep --config=FILE --workdir=BASE [options] [-- ARGS]")
    parser.add_argument("--config", required=True, help="config file with sweep(add), optionally FILE:ARG")
    parser.add_argument("--workdir", required=True, help="base directory: one workdir per run inside")
    parser.add_argument("--mode", choices=("local", "tpu"), default="local")
    parser.add_argument("--only", action="append", default=[], help="key=value: only runs with that override")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--tpu_name", default="")
    parser.add_argument("--tpu_zone", default="")
    parser.add_argument("--tpu_project", default="")
    parser.add_argument("--tpu_bucket", default="", help="gs://... mounted on the workers; workdirs go there")
    parser.add_argument("--tpu_venv", default="~/prefjax-venv")
    parser.add_argument("extra_args", nargs=argparse.REMAINDER, help="-- then prefjax.main arguments for every run")
    args = parser.parse_args(argv)
    extra = args.extra_args[1:] if args.extra_args[:1] == ["--"] else args.extra_args
    if any(a.startswith(("--workdir", "--config=")) for a in extra):
        parser.error("--config and --workdir belong to launch.sweep (before --), not to the per-run arguments")
    try:
        config, every_run = expand(args.config)
        runs = select(every_run, args.only)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no run of {args.config} matches --only={args.only}", file=sys.stderr)
        return 2
    executor = Executor(dry_run=args.dry_run)
    if args.mode == "local":
        base = Path(args.workdir)
        if not args.dry_run:  # every run, so the collector also lists those --only left out
            write_manifest(base, args.config, every_run, extra)
        failed = run_local(args.config, config, runs, base, extra, executor)
        if not args.dry_run:
            from launch import collect  # pylint: disable=import-outside-toplevel

            print(collect.table(collect.collect(base)))
    else:
        try:
            pod = tpu_pod.TpuPod(args.tpu_name, args.tpu_zone, args.tpu_project)
        except ValueError as err:
            parser.error(f"--mode=tpu: {err} (--tpu_name, --tpu_zone)")
        try:
            failed = run_tpu(args.config, config, runs, args.workdir, extra, executor, pod,
                             tarball=f"/tmp/prefjax-{args.tpu_name}.tar.gz", bucket=args.tpu_bucket,
                             venv=args.tpu_venv)
        except subprocess.CalledProcessError as err:
            print(f"error: shipping the checkout failed: {err.cmd}", file=sys.stderr)
            return 1
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
