"""West-of-N preference pairs: N samples per prompt, scored by the reward; best vs worst.

    pairs = west_of_n.select(responses, rewards, n=8)     # PairSet of (prompt, chosen, rejected)
    west_of_n.write_pairs(pairs, "pairs/train.jsonl")      # raw rows prefjax.data.load_source reads

Each prompt's N responses (consecutive rows of `responses`) are ranked by the
ground-truth reward; the highest-reward response becomes "chosen" and the
lowest "rejected" (Pace et al. 2024, "West-of-N"). Only complete responses
(ended with EOS, made of task symbols; see rollouts.Responses) compete, and a
prompt whose best and worst rewards tie yields no pair: a tie carries no
preference. Ties among the best (or the worst) are broken by the sample order,
which is random.

Datasets are written in the data contract's raw-row forms (text format):
pairs {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"};
unpaired rows {"prompt", "completion", "label"} (best desirable, worst not) for
KTO-style losses; ranked rows {"prompt", "responses", "scores"} (the best, the
worst and distinct responses in between, K per row) for listwise losses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from prefjax.data.label_noise import choose_flips
from prefjax.quickstart.rollouts import Responses


@dataclasses.dataclass
class PairSet:
    """Preference pairs; index i of every list is one pair. `ranked` holds up to N distinct
    complete responses per pair's prompt, best first, with their rewards (for listwise data)."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    score_chosen: list[float]
    score_rejected: list[float]
    ranked: list[list[tuple[str, float]]]
    num_prompts: int  # prompts sampled, including those that gave no pair

    def __len__(self) -> int:
        return len(self.prompts)

    def as_rows(self) -> list[dict]:
        return [{"prompt": p, "chosen": c, "rejected": r, "score_chosen": sc, "score_rejected": sr}
                for p, c, r, sc, sr in zip(self.prompts, self.chosen, self.rejected, self.score_chosen,
                                           self.score_rejected)]


def select(responses: Responses, rewards: np.ndarray, n: int) -> PairSet:
    """Best-vs-worst pairs from `responses`, whose rows are prompts repeated n times consecutively."""
    if len(responses) % n:
        raise ValueError(f"{len(responses)} responses is not a multiple of n={n}")
    rewards = np.asarray(rewards, np.float64)
    out = PairSet([], [], [], [], [], [], num_prompts=len(responses) // n)
    for start in range(0, len(responses), n):
        rows = [i for i in range(start, start + n) if responses.complete[i]]
        if len(rows) < 2:
            continue
        # Stable sort: among equal rewards the earlier (random) sample comes first.
        order = sorted(rows, key=lambda i: -rewards[i])
        best, worst = order[0], order[-1]
        if rewards[best] <= rewards[worst]:
            continue
        prompt = responses.prompts[start]
        out.prompts.append(prompt)
        out.chosen.append(responses.texts[best])
        out.rejected.append(responses.texts[worst])
        out.score_chosen.append(float(rewards[best]))
        out.score_rejected.append(float(rewards[worst]))
        distinct: dict[str, float] = {}
        for i in order:
            distinct.setdefault(responses.texts[i].strip(), float(rewards[i]))
        out.ranked.append(list(distinct.items()))
    return out


def _write_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_pairs(pairs: PairSet, path: str | Path) -> Path:
    """The pairs as JSONL pair rows (text format)."""
    if not len(pairs):
        raise ValueError(f"{path}: no preference pairs to write: every prompt's samples tied on reward; "
                         "raise west_of_n.n or the sampling temperature")
    return _write_jsonl(pairs.as_rows(), path)


def write_unpaired(pairs: PairSet, path: str | Path) -> Path:
    """Each pair as two unpaired rows: chosen desirable, rejected undesirable."""
    rows = []
    for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected):
        rows += [{"prompt": p, "completion": c, "label": True},
                 {"prompt": p, "completion": r, "label": False}]
    return _write_jsonl(rows, path)


def write_ranked(pairs: PairSet, path: str | Path, k: int) -> int:
    """Ranked rows of exactly k distinct responses (the k - 1 best and the worst); prompts with fewer
    than k distinct complete responses are left out. Returns the number of rows written."""
    rows = []
    for prompt, ranked in zip(pairs.prompts, pairs.ranked):
        if len(ranked) < k:
            continue
        keep = ranked[:k - 1] + [ranked[-1]]
        rows.append({"prompt": prompt, "responses": [t for t, _ in keep], "scores": [s for _, s in keep]})
    _write_jsonl(rows, path)
    return len(rows)


def read_pairs(path: str | Path) -> PairSet:
    """Pair rows written by write_pairs (no ranked lists); errors name the file and line."""
    out = PairSet([], [], [], [], [], [], num_prompts=0)
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
            fields = (row["prompt"], row["chosen"], row["rejected"], float(row["score_chosen"]),
                      float(row["score_rejected"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{number}: not a West-of-N pair row "
                             f"({type(err).__name__}: {err})") from None
        columns = (out.prompts, out.chosen, out.rejected, out.score_chosen, out.score_rejected)
        for values, value in zip(columns, fields):
            values.append(value)
        out.ranked.append([])
    out.num_prompts = len(out.prompts)
    return out


def write_flipped(source: str | Path, path: str | Path, rate: float, seed: int) -> int:
    """A copy of a pair or unpaired JSONL file with exactly round(rate * rows) preferences flipped
    (chosen <-> rejected with their scores; unpaired labels negated), the rows chosen by
    prefjax.data.label_noise.choose_flips(rows, rate, seed): for one seed, the rows flipped at a
    lower rate are among those flipped at a higher one. Returns the number of flipped rows."""
    lines = Path(source).read_text().splitlines()
    flips = choose_flips(len(lines), rate, seed)
    rows = []
    for number, (line, flip) in enumerate(zip(lines, flips), start=1):
        row = json.loads(line)
        if flip and "chosen" in row:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            row["score_chosen"], row["score_rejected"] = row.get("score_rejected"), row.get("score_chosen")
        elif flip and "label" in row:
            row["label"] = not row["label"]
        elif flip:
            raise ValueError(f"{source}:{number}: label noise needs pair rows (chosen/rejected) or unpaired "
                             "rows (label)")
        rows.append(row)
    _write_jsonl(rows, path)
    return int(flips.sum())
