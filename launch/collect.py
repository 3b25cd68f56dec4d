"""A sweep's results: a table of final metrics per run, and a metric plotted against a swept key.

    python -m launch.collect /tmp/sweep                          # the table
    python -m launch.collect /tmp/sweep --metrics=final/loss,eval/loss
    python -m launch.collect /tmp/sweep --plot_x=loss.beta --plot_metric=final/loss --plot_out=beta.png

Runs and their overrides come from BASE/sweep.json (written by launch.sweep); without it
(e.g. workdirs copied back from a bucket) every subdirectory holding metrics.jsonl or
summary.json is a run, and its overrides are read back from its name
(`loss_name=dpo,loss.beta=0.1`). A finished run reports summary.json's final/ and eval/
values; an unfinished one the last record of its metrics.jsonl (status `partial`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch import run_status

DEFAULT_METRICS = ("final/loss", "final/rewards/accuracies", "final/rewards/margins")


@dataclasses.dataclass
class RunResult:
    """One run of a sweep, as found on disk."""

    name: str
    overrides: dict[str, Any]
    status: str  # finished | preempted | partial | missing
    step: int | None
    metrics: dict[str, float]


def _overrides_from_name(name: str) -> dict[str, Any]:
    """`a=1,b.c=x` -> {"a": "1", "b.c": "x"} (values stay text; plots convert what they can)."""
    pairs = [part.partition("=") for part in name.split(",")]
    return {k: v for k, sep, v in pairs if sep} if all(sep for _, sep, _ in pairs) else {}


def _read_manifest(base: Path) -> list[tuple[str, dict[str, Any]]] | None:
    path = base / "sweep.json"
    if not path.is_file():
        return None
    try:
        runs = json.loads(path.read_text())["runs"]
        return [(r["name"], dict(r["overrides"])) for r in runs]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a sweep manifest ({err})") from None


def _result(workdir: Path, name: str, overrides: dict[str, Any]) -> RunResult:
    summary = run_status.read_summary(workdir)
    metrics = run_status.final_metrics(workdir)
    if summary is not None:
        status = "preempted" if summary.get("preempted") else "finished"
        step = summary.get("step")
    else:
        last = run_status.last_metrics(workdir)
        status = "partial" if last else "missing"
        step = last.get("step")
    return RunResult(name, overrides, status, step, metrics)


def collect(base: str | Path) -> list[RunResult]:
    """Every run of the sweep under `base`, in the sweep's order (else by name)."""
    base = Path(base)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no such sweep directory")
    listed = _read_manifest(base)
    if listed is None:
        dirs = sorted(p for p in base.iterdir()
                      if (p / run_status.SUMMARY).is_file() or (p / run_status.METRICS).is_file())
        listed = [(p.name, _overrides_from_name(p.name)) for p in dirs]
    return [_result(base / name, name, overrides) for name, overrides in listed]


def swept_keys(results: Sequence[RunResult]) -> list[str]:
    """Override keys in first-seen order."""
    keys: list[str] = []
    for r in results:
        keys += [k for k in r.overrides if k not in keys]
    return keys


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def table(results: Sequence[RunResult], metrics: Sequence[str] | None = None) -> str:
    """A fixed-width text table: swept keys, status, step, then the metrics."""
    if metrics is None:
        evals = sorted({k for r in results for k in r.metrics if k.startswith("eval/")})
        metrics = [*DEFAULT_METRICS, *evals]
    keys = swept_keys(results)
    header = [*keys, "status", "step", *metrics]
    rows = [[_cell(r.overrides.get(k)) for k in keys] + [r.status, _cell(r.step)]
            + [_cell(r.metrics.get(m)) for m in metrics] for r in results]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def plot(results: Sequence[RunResult], x: str, metric: str, path: str | None = None):
    """`metric` against swept key `x`, one line per setting of the other swept keys.

    Returns the matplotlib Figure (shown inline in a notebook); saves it when `path` is given.
    Numeric x values are placed by value, others in order of appearance.
    """
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel -- only plots need it

    if x not in swept_keys(results):
        raise ValueError(f"--plot_x={x!r} is not a swept key; swept: {swept_keys(results)}")
    others = [k for k in swept_keys(results) if k != x]
    lines: dict[str, list[tuple[Any, float]]] = {}
    for r in results:
        if x in r.overrides and metric in r.metrics:
            label = ",".join(f"{k}={r.overrides.get(k, '-')}" for k in others) or metric
            lines.setdefault(label, []).append((r.overrides[x], r.metrics[metric]))
    if not lines:
        raise ValueError(f"no run has both {x!r} and the metric {metric!r}")
    xs = [v for points in lines.values() for v, _ in points]
    numeric = all(_number(v) is not None for v in xs)
    categories = list(dict.fromkeys(str(v) for v in xs))
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for label, points in lines.items():
        points = sorted(points, key=lambda p: _number(p[0]) if numeric else categories.index(str(p[0])))
        px = [_number(v) if numeric else categories.index(str(v)) for v, _ in points]
        ax.plot(px, [y for _, y in points], marker="o", label=label)
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--metrics", default="", help="comma-separated (default: loss, accuracy, margin, eval/*)")
    parser.add_argument("--plot_x", default="", help="a swept key for the x axis")
    parser.add_argument("--plot_metric", default="final/loss")
    parser.add_argument("--plot_out", default="", help="PNG path (default: SWEEP_DIR/<metric>_vs_<x>.png)")
    args = parser.parse_args(argv)
    try:
        results = collect(args.sweep_dir)
        print(table(results, args.metrics.split(",") if args.metrics else None))
        if args.plot_x:
            out = args.plot_out or str(Path(args.sweep_dir) / (
                f"{args.plot_metric}_vs_{args.plot_x}.png".replace("/", "_")))
            plot(results, args.plot_x, args.plot_metric, out)
            print(f"wrote {out}")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
