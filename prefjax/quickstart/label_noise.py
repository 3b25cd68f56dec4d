"""DPO, cDPO and robust DPO under flipped labels: runs configs/quickstart_label_noise.py in one process.

    python -m prefjax.quickstart.label_noise --workdir=/tmp/label-noise [--small] [--seeds=0,1,2]

Prints (and writes to WORKDIR/label_noise.md and .json) the tuned policies' ground-truth
reward per method and flip rate, mean ± sd over seeds, with the clean-DPO and SFT rows for
scale; WORKDIR/label_noise.png plots the reward against the flip rate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from prefjax.quickstart import grid, plots, report

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart_label_noise.py"


def method_of(overrides: dict[str, Any]) -> str:
    if overrides.get("loss_name") == "robust_dpo":
        return "robust DPO"
    return "cDPO" if overrides.get("loss.label_smoothing", 0.0) > 0 else "DPO"


def collect(results: Sequence[dict[str, Any]], metric: str = "reward") -> dict[str, dict[float, list[float]]]:
    """method -> flip rate -> the metric of the tuned policy per seed."""
    out: dict[str, dict[float, list[float]]] = {}
    for r in results:
        eps = float(r["overrides"].get("tune.label_noise", 0.0))
        out.setdefault(method_of(r["overrides"]), {}).setdefault(eps, []).append(float(r["tuned"][metric]))
    return out


def table(results: Sequence[dict[str, Any]], *, markdown: bool = False, metric: str = "reward") -> str:
    values = collect(results, metric)
    rates = sorted({eps for per in values.values() for eps in per})
    sft = [r["sft"][metric] for r in {r["seed"]: r for r in results}.values()]
    rows = [["SFT (reference)"] + [report.mean_and_spread(sft)] * len(rates)]
    for method in ("DPO", "cDPO", "robust DPO"):
        if method in values:
            per = values[method]
            rows.append([method] + [report.mean_and_spread(per[eps]) if eps in per else "-" for eps in rates])
    header = [f"{metric} by flip rate"] + [f"{eps:.0%} flipped" for eps in rates]
    return report.table(header, rows, markdown=markdown)


def plot(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    values = collect(results)
    fig = Figure(figsize=(5.6, 4.0))
    ax = fig.subplots()
    clean = values.get("DPO", {}).get(0.0)
    for method, per in values.items():
        rates = sorted(set(per) | ({0.0} if clean else set()))
        means = [np.mean(per.get(eps, clean)) for eps in rates]
        sds = [np.std(per.get(eps, clean), ddof=1) if len(per.get(eps, clean)) > 1 else 0.0 for eps in rates]
        ax.errorbar(rates, means, yerr=sds, marker="o", capsize=3, label=method)
    sft = np.mean([r["sft"]["reward"] for r in {r["seed"]: r for r in results}.values()])
    ax.axhline(sft, color="tab:gray", ls=":", lw=0.8, label="SFT reference")
    ax.set(xlabel="fraction of preference labels flipped", ylabel="mean ground-truth reward",
           title="label noise: DPO vs cDPO vs robust DPO")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plots.save(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, results = grid.cli(__doc__.splitlines()[0], DEFAULT_CONFIG, argv)
    workdir = Path(args.workdir)
    text = table(results)
    (workdir / "label_noise.md").write_text(table(results, markdown=True) + "\n\n"
                                            + table(results, markdown=True, metric="win_rate") + "\n")
    (workdir / "label_noise.json").write_text(json.dumps(
        [{k: r[k] for k in ("name", "seed", "overrides", "sft", "tuned")} for r in results], indent=2) + "\n")
    png = plot(results, workdir / "label_noise.png")
    print()
    print(text)
    print(f"\nplot: {png}\ntable: {workdir / 'label_noise.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
