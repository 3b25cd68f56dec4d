"""The reward-KL frontier of several losses: runs configs/quickstart_frontier.py in one process.

    python -m prefjax.quickstart.frontier --workdir=/tmp/frontier [--small] [--seeds=0,1,2]

One SFT model and one West-of-N dataset per seed (prefjax.quickstart.grid), then one
preference-tuning run per (loss, beta). Writes WORKDIR/frontier.png (ground-truth reward
against KL(policy || SFT), one line per loss across beta, best-of-n from SFT dashed),
WORKDIR/frontier.json and WORKDIR/frontier.md (the table), and prints the table.
With several seeds the points are seed means.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from prefjax.quickstart import grid, pipeline, plots, report

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart_frontier.py"
METRICS = ("reward", "kl", "win_rate", "reward_accuracy")


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run name: the seed means (and sds) of the tuned policy's metrics."""
    by_name: dict[str, list[dict[str, Any]]] = collections.OrderedDict()
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    rows = []
    for name, runs in by_name.items():
        row = {"name": name, "overrides": runs[0]["overrides"], "seeds": [r["seed"] for r in runs]}
        for key in METRICS:
            values = [r["tuned"][key] for r in runs if key in r["tuned"]]
            row[key] = float(np.mean(values)) if values else float("nan")
            row[f"{key}_values"] = values
        row["reward_se"] = (float(np.std(row["reward_values"], ddof=1) / np.sqrt(len(runs))) if len(runs) > 1
                            else float(runs[0]["tuned"]["reward_se"]))
        rows.append(row)
    return rows


def sft_reference(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The SFT policy's reward (seed mean) and the best-of-n curve (seed means)."""
    per_seed = {r["seed"]: r for r in results}
    sft_reward = float(np.mean([r["sft"]["reward"] for r in per_seed.values()]))
    curves = [r["best_of_n"] for r in per_seed.values()]
    best_of_n = [{"n": p["n"], "kl": p["kl"], "reward": float(np.mean([c[i]["reward"] for c in curves]))}
                 for i, p in enumerate(curves[0])]
    return {"reward": sft_reward, "best_of_n": best_of_n}


def table(rows: Sequence[dict[str, Any]], sft_reward: float, *, markdown: bool = False) -> str:
    body = [["SFT (reference)", "-", sft_reward, 0.0, 0.5, 0.5]]
    for r in rows:
        o = r["overrides"]
        body.append([o.get("loss_name", "?"), str(o.get("loss.beta", "-")), r["reward"], r["kl"],
                     r["win_rate"], r["reward_accuracy"]])
    header = ["loss", "beta", "reward", "KL", "win rate", "reward acc."]
    return report.table(header, body, markdown=markdown)


def write_outputs(results: Sequence[dict[str, Any]], workdir: str | Path, *,
                  reward_range: Optional[tuple] = None) -> dict[str, Path]:
    """frontier.json, frontier.md and frontier.png from the runs' summaries."""
    workdir = Path(workdir)
    rows = aggregate(results)
    ref = sft_reference(results)
    points = [{"label": f"β={r['overrides'].get('loss.beta')}",
               "group": r["overrides"].get("loss_name", r["name"]),
               "kl": r["kl"], "reward": r["reward"], "reward_se": r["reward_se"]} for r in rows]
    png = plots.reward_vs_kl(points, ref["best_of_n"], workdir / "frontier.png", reward_range=reward_range,
                             reference_reward=ref["reward"], title="reward-KL frontier (quick-start task)")
    (workdir / "frontier.json").write_text(json.dumps({"rows": rows, "sft": ref}, indent=2) + "\n")
    md = workdir / "frontier.md"
    md.write_text(table(rows, ref["reward"], markdown=True) + "\n")
    return {"plot": png, "json": workdir / "frontier.json", "table": md}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, results = grid.cli(__doc__.splitlines()[0], DEFAULT_CONFIG, argv)
    module = grid.load_module(args.config)
    task = pipeline.make_task(module.get_config("small" if args.small else None))
    files = write_outputs(results, args.workdir, reward_range=task.reward_range)
    print()
    print(table(aggregate(results), sft_reference(results)["reward"]))
    print(f"\nplot: {files['plot']}\ntable: {files['table']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
