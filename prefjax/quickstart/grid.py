"""Running a quick-start config's `sweep(add)` in one process, sharing one SFT model and dataset.

    results = grid.run_grid("configs/quickstart_frontier.py", "/tmp/frontier", arg="small")

A sweep config (configs/quickstart_frontier.py, configs/quickstart_label_noise.py) defines
`sweep(add)`; each `add(**overrides)` is one run (a double underscore in a keyword stands
for a dot: `loss__beta=0.1` is `loss.beta`), the same contract launch/sweep.py expands into
separate processes. Here the task, SFT model and West-of-N pairs are prepared once under
WORKDIR/base/, the SFT policy is evaluated once, and each run only tunes and evaluates, in
WORKDIR/runs/<name>/. Runs must therefore change only stage 4-5 keys (loss, total_steps,
tune.*, eval.*); several seeds (`seeds=`) each get their own base. A run whose
summary.json is finished is read back instead of rerun, so an interrupted grid resumes.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

import ml_collections

from prefjax.quickstart import pipeline

Echo = Callable[[str], None]


def load_module(path: str | Path) -> ModuleType:
    """A config file as a module (the way prefjax.main loads it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location(f"_prefjax_grid_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """config[key] = value for a dotted key that must already exist (KeyError naming it otherwise)."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise KeyError(f"the config has no key {key!r}")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise KeyError(f"the config has no key {key!r}")
    node[leaf] = value


def expand(module: ModuleType) -> list[dict[str, Any]]:
    """The override dicts (dotted keys, in call order) that the module's sweep(add) adds."""
    if not callable(getattr(module, "sweep", None)):
        raise ValueError(f"{module.__file__}: defines no sweep(add) function")
    runs: list[dict[str, Any]] = []
    module.sweep(lambda **overrides: runs.append({k.replace("__", "."): v for k, v in overrides.items()}))
    return runs


def run_name(overrides: dict[str, Any]) -> str:
    """`key=value,key=value` (launch.sweep's naming), safe as a directory name."""
    text = ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def configure(base: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `base` with the overrides applied (each key must exist)."""
    config = copy.deepcopy(base)
    for key, value in overrides.items():
        set_key(config, key, value)
    return config


def run_grid(config_path: str | Path, workdir: str | Path, *, arg: Optional[str] = None,
             seeds: Sequence[int] = (0,), echo: Echo = print) -> list[dict[str, Any]]:
    """Every run of the config's sweep for every seed; the list of run summaries, each with
    "name", "overrides" and "seed" added."""
    module = load_module(config_path)
    base_config = module.get_config(arg) if arg else module.get_config()
    grid = expand(module)
    results = []
    for seed in seeds:
        seeded = configure(base_config, {"seed": seed})
        root = Path(workdir) / (f"seed{seed}" if len(seeds) > 1 else "")
        prepared = pipeline.prepare(seeded, root / "base", echo)
        settings = pipeline.prepare_settings(seeded)
        evaluator = None
        for i, overrides in enumerate(grid, start=1):
            config = configure(seeded, overrides)
            config.reuse = str(root / "base")
            if pipeline.prepare_settings(config) != settings:
                raise ValueError(f"{config_path}: run {run_name(overrides)} changes the task, SFT or "
                                 "West-of-N settings, which the runs of a grid share; sweep only loss, "
                                 "total_steps, tune.* and eval.* keys")
            name = run_name(overrides)
            run_dir = root / "runs" / name
            done = _finished(run_dir, config.total_steps)
            echo(f"=== seed {seed}, run {i}/{len(grid)}: {name}" + (" (finished, read back)" if done else ""))
            if done is None:
                evaluator = evaluator or pipeline.make_evaluator(seeded, prepared)
                done = pipeline.run(config, str(run_dir), echo=echo, make_plots=False, prepared=prepared,
                                    evaluator=evaluator)
            results.append(dict(done, name=name, overrides=overrides, seed=seed))
    return results


def _finished(run_dir: Path, total_steps: int) -> Optional[dict[str, Any]]:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    finished = not summary.get("preempted") and summary.get("step") == total_steps and "tuned" in summary
    return summary if finished else None


def parse_seeds(text: str) -> list[int]:
    """--seeds "0,1,2" -> [0, 1, 2]; anything else exits with a message naming the flag."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds={text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def parser(description: str, default_config: str | Path) -> argparse.ArgumentParser:
    """The experiment scripts' shared flags: --workdir, --config, --small, --seeds."""
    flags = argparse.ArgumentParser(description=description)
    flags.add_argument("--workdir", required=True)
    flags.add_argument("--config", default=str(default_config),
                       help="a config file with get_config and sweep(add)")
    flags.add_argument("--small", action="store_true", help="the shrunken quick start (get_config('small'))")
    flags.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    return flags


def cli(description: str, default_config: str | Path,
        argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[dict[str, Any]]]:
    """The experiment scripts' shared command line (`parser`): parses it and runs the config's
    grid; (the parsed flags, the run summaries)."""
    args = parser(description, default_config).parse_args(argv)
    results = run_grid(args.config, args.workdir, arg="small" if args.small else None,
                       seeds=parse_seeds(args.seeds))
    return args, results
