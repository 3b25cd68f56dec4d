"""PNG plots of a quick-start run: training curves, and ground-truth reward against KL.

    plots.training_curves(sft_history, tune_records, "plots/training_curves.png")
    plots.reward_vs_kl(points, best_of_n, "plots/reward_vs_kl.png", reward_range=(0, 1))

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`) and
saved through the Agg canvas, so nothing here touches pyplot's global backend:
a notebook keeps its inline display, and headless runs need no display.

Reward-KL points are dicts {"label", "group", "kl", "reward", "reward_se"}: the
points of one group (e.g. one loss at several beta) are joined in the order given
(e.g. from large to small beta), as in the DPO paper's figure 2. `best_of_n` rows
{"n", "kl", "reward"} draw the best-of-n baseline from the SFT policy's samples, at
the analytic KL bound log n - (n - 1) / n.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from matplotlib.figure import Figure

# Trainer metrics shown, with panel titles (those absent from the records are skipped).
TUNE_PANELS = (("loss", "preference loss"), ("rewards/accuracies", "train reward accuracy"),
               ("rewards/margins", "implicit reward margin"))


def save(fig: Figure, path: str | Path) -> Path:
    """Writes `fig` as a PNG at `path` (parent folders created) the way every quick-start plot is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def training_curves(sft_history: Sequence[Mapping[str, float]], tune_records: Sequence[Mapping[str, Any]],
                    path: str | Path, *, title: str = "") -> Path:
    """SFT loss, then the preference trainer's loss, reward accuracy and margin, against step."""
    panels = [(key, name) for key, name in TUNE_PANELS if any(key in r for r in tune_records)]
    fig = Figure(figsize=(4.0 * (1 + len(panels)), 3.2))
    axes = fig.subplots(1, 1 + len(panels), squeeze=False)[0]
    axes[0].plot([h["step"] for h in sft_history], [h["loss"] for h in sft_history], color="tab:gray")
    axes[0].set(title="SFT loss (NLL per token)", xlabel="step")
    for ax, (key, name) in zip(axes[1:], panels):
        rows = [r for r in tune_records if key in r]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], color="tab:blue")
        ax.set(title=name, xlabel="preference-tuning step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def reward_vs_kl(points: Sequence[Mapping[str, Any]], best_of_n: Sequence[Mapping[str, float]],
                 path: str | Path, *, reward_range: Optional[tuple[float, float]] = None,
                 reference_reward: Optional[float] = None,
                 title: str = "ground-truth reward vs KL(policy || reference)") -> Path:
    """Reward against KL: groups of points joined by lines, the best-of-n baseline dashed."""
    fig = Figure(figsize=(7.6, 4.6))
    ax = fig.subplots()
    if best_of_n:
        ax.plot([b["kl"] for b in best_of_n], [b["reward"] for b in best_of_n], "k--", marker=".",
                label="best-of-n from SFT")
        for b in best_of_n:
            ax.annotate(f"n={b['n']}", (b["kl"], b["reward"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color="0.3")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        groups.setdefault(p.get("group", p["label"]), []).append(p)
    for name, group in groups.items():
        line = ax.errorbar([p["kl"] for p in group], [p["reward"] for p in group],
                           yerr=[p.get("reward_se", 0.0) for p in group], marker="o", capsize=2, label=name,
                           linestyle="-" if len(group) > 1 else "none")
        for p in group:
            if p["label"] != name:
                ax.annotate(p["label"], (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=line[0].get_color())
    if reference_reward is not None:
        ax.axhline(reference_reward, color="tab:gray", lw=0.8, ls=":", label="SFT reference")
    if reward_range is not None:
        ax.axhline(reward_range[1], color="tab:green", lw=0.8, ls=":", label="maximum reward")
    ax.set(xlabel="KL(policy || reference) [nats per response]", ylabel="mean ground-truth reward",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save(fig, path)
