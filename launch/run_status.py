"""Whether a prefjax workdir holds a finished run, read from the files the trainer writes.

A run is finished when its summary.json exists, says it was not preempted, and its step
equals the total_steps the run was asked for (a rerun with more steps is not finished).

    python -m launch.run_status WORKDIR TOTAL_STEPS   # exit 0: finished, 1: not (yet)

The TPU bootstrap uses the command form to skip finished sweep runs on the workers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"


def read_summary(workdir: str | Path) -> dict[str, Any] | None:
    """The run's summary.json, or None when there is none yet.

    A summary that is not a JSON object raises ValueError naming the file.
    """
    path = Path(workdir) / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary


def is_finished(workdir: str | Path, total_steps: int) -> bool:
    """True when the workdir's run reached `total_steps` and was not preempted."""
    summary = read_summary(workdir)
    return bool(summary) and not summary.get("preempted", False) and summary.get("step") == total_steps


def last_metrics(workdir: str | Path) -> dict[str, Any]:
    """The last record of metrics.jsonl ({} when there is none): progress of an unfinished run.

    A torn last line (a run killed mid-write) is skipped, as prefjax.train.metrics does.
    """
    path = Path(workdir) / METRICS
    if not path.is_file():
        return {}
    for line in reversed(path.read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            return {k: (float(v) if v in ("NaN", "Infinity", "-Infinity") else v) for k, v in record.items()}
    return {}


def _float_or_nan(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def final_metrics(workdir: str | Path) -> dict[str, float]:
    """The run's numbers: summary.json's final/ and eval/ values, else the last metrics record."""
    summary = read_summary(workdir)
    if summary:
        return {k: _float_or_nan(v) for k, v in summary.items() if k.startswith(("final/", "eval/"))}
    return {f"final/{k}": _float_or_nan(v) for k, v in last_metrics(workdir).items() if k != "step"}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m launch.run_status WORKDIR TOTAL_STEPS", file=sys.stderr)
        return 2
    return 0 if is_finished(argv[0], int(argv[1])) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
