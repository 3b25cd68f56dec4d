"""RewardBench-format evaluation: a reward model's accuracy per subset and per section.

    python -m prefjax.reward.rewardbench --model checkpoints/rm --data filtered.parquet --json rb.json
    python -m prefjax.reward.rewardbench --model checkpoints/dpo --reference checkpoints/sft --beta 0.1 \\
        --data filtered.parquet --subsets alpacaeval-easy,math-prm

Input: rows in the layout of allenai/reward-bench's "filtered" split (``prompt``, ``chosen``,
``rejected``, ``subset``; ``id``, ``chosen_model`` and ``rejected_model`` are allowed and ignored),
as JSONL, a JSON array or Parquet (read by prefjax.data.readers; ``--data`` also takes a glob).
Prompts and responses are text or ``{role, content}`` message lists, checked as the trainer
checks a preference pair (prefjax.data.records.parse_row: no empty or identical responses).

Scoring: prefjax.reward's scorer (``score_examples``, the pair form of ``score``) renders each
pair's prompt + chosen and prompt + rejected as the trainer does (text: prompt, response, EOS;
messages: the chat template), in length buckets, and names a pair that does not fit the model's
context by file:line. An explicit reward model (``prefjax.reward.load``) and a DPO policy with
its reference as an implicit one (``prefjax.reward.load_implicit``, reward = beta * log-ratio)
are evaluated the same way. A multi-output head is compared on one output, named with ``--label``.

Accuracy: a pair is right when the chosen response's reward is above the rejected one's. A tie
counts 0.5 (RewardBench itself counts it 0, as wrong): a model that cannot tell two responses
apart is at chance on that pair, and 0.5 keeps a degenerate constant-reward model at 50 %
instead of 0 % (or 100 % with ">="). Ties are counted per subset in the output, so a model
that produces many shows it. Non-finite rewards are an error, not a silent loss.

Sections (RewardBench's subset -> section map, ``SECTIONS``): a section's score is the mean of
its subsets' accuracies weighted by their pair counts (``weighting="count"``), i.e. the
accuracy over all of the section's pairs. RewardBench's leaderboard additionally upweights
math-prm in Reasoning to the size of the code subsets together (it counts math-prm's 447 pairs
as 984 = 6 x 164, the hep-* total), so that math and code weigh half each:
``weighting="leaderboard"`` (``--reasoning-weighting=leaderboard``) does that with the hep-*
counts present in the file. Subsets outside the map form an "Other" section, reported but left
out of the overall score, which is the plain mean of the RewardBench sections present: that is
how RewardBench defines it, and rows of unknown subsets would make it incomparable. Scores are
fractions in [0, 1] (RewardBench prints percentages).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import jax
import numpy as np

from prefjax import reward
from prefjax import sharding as sharding_lib
from prefjax.data import readers
from prefjax.data.records import MISSING, WRONG_TYPE, DataError, Location, parse_row
from prefjax.quickstart import report
from prefjax.suggest import did_you_mean

SECTIONS: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
OTHER = "Other"
MATH_SUBSET = "math-prm"
WEIGHTINGS = ("count", "leaderboard")
FIELDS = ("prompt", "chosen", "rejected", "subset")
TIE_CREDIT = 0.5

_SECTION_OF = {subset: section for section, subsets in SECTIONS.items() for subset in subsets}


class RewardBenchError(ValueError):
    """Bad input to the evaluation: an empty file, an unknown subset or output name, bad options."""


def section_of(subset: str) -> str:
    """The RewardBench section of ``subset``, or "Other" for a subset outside the map."""
    return _SECTION_OF.get(subset, OTHER)


# ---------------------------------------------------------------------------------------------
# The evaluation set
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Bench:
    """RewardBench pairs in file order: canonical pair examples (prefjax.data.records, their
    "source" is file:line) and each pair's subset."""

    examples: list[dict[str, Any]]
    subsets: list[str]
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.subsets)

    def select(self, names: Sequence[str]) -> Bench:
        """Only the pairs of the subsets ``names``; each must occur in the files (did-you-mean otherwise)."""
        present = list(dict.fromkeys(self.subsets))
        files, listed = ", ".join(self.files), ", ".join(present)
        if not names:
            raise RewardBenchError(f"--subsets: no subset named; {files} has: {listed}")
        for name in names:
            if name not in present:
                raise RewardBenchError(f"--subsets: {name!r} is not a subset of {files}"
                                       f"{did_you_mean(name, present)}; it has: {listed}")
        wanted = set(names)
        keep = [i for i, subset in enumerate(self.subsets) if subset in wanted]
        return Bench([self.examples[i] for i in keep], [self.subsets[i] for i in keep], self.files)


def _parse(location: Location, row: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(the canonical pair example, the subset) of one row; DataError naming the field otherwise."""
    for field in FIELDS:
        if row.get(field) is None:  # absent, or null (a Parquet file stores a missing cell as null)
            raise DataError(location, field, f"missing; RewardBench rows need {', '.join(FIELDS)}", MISSING)
    subset = row["subset"]
    if not isinstance(subset, str) or not subset.strip():
        raise DataError(location, "subset", f"must be a non-empty subset name, got {subset!r}", WRONG_TYPE)
    # The trainer's row checks (text or messages, no empty or identical responses), so the pair is
    # scored exactly as the reward model's training pairs were rendered.
    return parse_row(row, "pair", location), subset


def read_bench(paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]) -> Bench:
    """Reads RewardBench rows from files (paths or globs; JSONL, JSON array or Parquet).

    Raises DataError (file, line or row, field) for a bad row and RewardBenchError for a file
    without rows.
    """
    files = readers.expand_paths(paths)
    examples, subsets = [], []
    for path in files:
        rows = 0
        for location, row in readers.read_rows(path):
            rows += 1
            example, subset = _parse(location, row)
            examples.append(example)
            subsets.append(subset)
        if not rows:
            raise RewardBenchError(f"{path}: no rows; expected RewardBench rows with {', '.join(FIELDS)}")
    return Bench(examples, subsets, tuple(files))


# ---------------------------------------------------------------------------------------------
# Scores (pure)
# ---------------------------------------------------------------------------------------------

def subset_accuracies(rewards_chosen: Sequence[float], rewards_rejected: Sequence[float],
                      subsets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per subset (first-appearance order): ``{"accuracy", "count", "ties"}``.

    A pair scores 1 when its chosen reward is above its rejected reward, 0.5 on a tie (see the
    module docstring), else 0; a subset's accuracy is the mean over its pairs.
    """
    chosen = np.asarray(rewards_chosen, dtype=np.float64)
    rejected = np.asarray(rewards_rejected, dtype=np.float64)
    if chosen.ndim != 1 or chosen.shape != rejected.shape or len(subsets) != chosen.shape[0]:
        raise ValueError(f"need one chosen and one rejected reward per subset entry, got shapes "
                         f"{chosen.shape}, {rejected.shape} and {len(subsets)} subsets")
    finite = np.isfinite(chosen) & np.isfinite(rejected)
    if not finite.all():
        first = int(np.argmin(finite))
        raise ValueError(f"{int((~finite).sum())} of {len(chosen)} pairs have a non-finite reward (first: "
                         f"pair {first}, chosen {chosen[first]}, rejected {rejected[first]}); the model is "
                         "broken")
    ties = chosen == rejected
    credit = (chosen > rejected) + TIE_CREDIT * ties
    names = np.asarray(subsets, dtype=object)
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(subsets):
        mask = names == name
        out[name] = {"accuracy": float(credit[mask].mean()), "count": int(mask.sum()),
                     "ties": int(ties[mask].sum())}
    return out


def _grouped(subset_names: Iterable[str]) -> dict[str, list[str]]:
    """Section -> its subsets among ``subset_names``: RewardBench's order, then Other in the given order."""
    names = list(subset_names)
    groups = {section: [s for s in members if s in names] for section, members in SECTIONS.items()}
    groups[OTHER] = [s for s in names if s not in _SECTION_OF]
    return {section: members for section, members in groups.items() if members}


def section_scores(subset_results: Mapping[str, Mapping[str, Any]],
                   weighting: str = "count") -> dict[str, dict[str, Any]]:
    """Per section present: ``{"accuracy", "count", "subsets"}``, its subsets' accuracies averaged.

    ``weighting="count"`` weights each subset by its pair count; ``"leaderboard"`` also gives
    math-prm in Reasoning the weight of the hep-* subsets present together (as RewardBench's
    leaderboard does). "Other" (subsets outside the map) comes last.
    """
    if weighting not in WEIGHTINGS:
        raise RewardBenchError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}"
                               f"{did_you_mean(weighting, WEIGHTINGS)}")
    out: dict[str, dict[str, Any]] = {}
    for section, members in _grouped(subset_results).items():
        weights = {name: float(subset_results[name]["count"]) for name in members}
        if weighting == "leaderboard" and section == "Reasoning" and MATH_SUBSET in weights:
            code = sum(w for name, w in weights.items() if name != MATH_SUBSET)
            if code:  # without code subsets math-prm is the section on its own
                weights[MATH_SUBSET] = code
        total = sum(weights.values())
        if not total:
            continue
        accuracy = sum(float(subset_results[name]["accuracy"]) * weights[name] for name in members) / total
        out[section] = {"accuracy": accuracy, "count": int(sum(subset_results[n]["count"] for n in members)),
                        "subsets": list(members)}
    return out


def overall_score(sections: Mapping[str, Mapping[str, Any]]) -> Optional[float]:
    """The mean of the RewardBench sections present ("Other" left out); None when there are none."""
    scores = [float(result["accuracy"]) for section, result in sections.items() if section != OTHER]
    return sum(scores) / len(scores) if scores else None


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def output_column(model: Any, num_outputs: int, label: Optional[str] = None) -> tuple[int, str]:
    """(column, name) of the reward output to compare: the only one, or the one named ``label``."""
    labels = tuple(getattr(model, "labels", ()) or ())
    if label is None:
        if num_outputs == 1:
            return 0, labels[0] if labels else "reward"
        raise RewardBenchError(f"the model has {num_outputs} reward outputs ({', '.join(labels)}); "
                               "RewardBench compares one: name it with --label")
    if label not in labels:
        raise RewardBenchError(f"--label {label!r}: the model's outputs are {', '.join(labels) or 'unnamed'}"
                               f"{did_you_mean(label, labels)}")
    return labels.index(label), label


def evaluate(model: Any, bench: Bench, *, batch_size: int = 32, label: Optional[str] = None,
             weighting: str = "count", max_len: Optional[int] = None,
             mesh: Optional[jax.sharding.Mesh] = None) -> dict[str, Any]:
    """Scores ``bench`` with ``model`` (prefjax.reward) -> {subsets, sections, overall, pairs, label, ...}."""
    if weighting not in WEIGHTINGS:  # checked before the (slow) scoring
        section_scores({}, weighting)
    # score_examples scores each pair's chosen and rejected response (in that order) in length
    # buckets, and names a too-long one by file:line and side.
    per_pair = reward.score_examples(model, bench.examples, batch_size=batch_size, max_len=max_len, mesh=mesh)
    rewards = np.stack([np.asarray(r, np.float32) for r in per_pair])  # [N, 2, L]
    column, name = output_column(model, rewards.shape[2], label)
    subsets = subset_accuracies(rewards[:, 0, column], rewards[:, 1, column], bench.subsets)
    sections = section_scores(subsets, weighting)
    ordered = {name_: subsets[name_] for result in sections.values() for name_ in result["subsets"]}
    return {"subsets": ordered, "sections": sections, "overall": overall_score(sections), "pairs": len(bench),
            "label": name, "weighting": weighting, "tie_credit": TIE_CREDIT}


def format_report(result: Mapping[str, Any]) -> str:
    """The subset table, the section table, the overall score and what "Other" means."""
    subsets, sections = result["subsets"], result["sections"]
    subset_rows = [[name, section_of(name), r["count"], r["ties"], r["accuracy"]]
                   for name, r in subsets.items()]
    section_rows = [[section, len(r["subsets"]), r["count"], r["accuracy"]]
                    for section, r in sections.items()]
    section_rows.append(["overall", "", "", result["overall"]])
    known = [section for section in sections if section != OTHER]
    weighting = ("" if result["weighting"] == "count"
                 else " (leaderboard weighting: math-prm weighs as much as the hep-* subsets together)")
    overall = (f"overall is the mean of the {len(known)} RewardBench section(s) present" if known
               else "no RewardBench section is present, so there is no overall score")
    lines = [report.table(["subset", "section", "pairs", "ties", "accuracy"], subset_rows), "",
             report.table(["section", "subsets", "pairs", "accuracy"], section_rows), "",
             f"Sections are count-weighted means of their subsets{weighting}; {overall}. A tie counts 0.5."]
    if OTHER in sections:
        others = ", ".join(sections[OTHER]["subsets"])
        lines.append(f"Other: subsets outside RewardBench's section map ({others}); reported, not in the "
                     "overall score.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prefjax.reward.rewardbench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="reward model folder or Hub id; with --reference, the "
                        "DPO policy scored as an implicit reward model")
    parser.add_argument("--reference",
                        help="reference model folder or Hub id (implicit reward; needs --beta)")
    parser.add_argument("--beta", type=float,
                        help="beta of the implicit reward beta * log(policy / reference)")
    parser.add_argument("--data", required=True,
                        help="RewardBench rows: .jsonl, .json or .parquet (or a glob)")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--batch-size", type=int, default=32, help="responses per scoring batch (default 32)")
    parser.add_argument("--subsets", help="comma-separated subsets to evaluate (default: all in the file)")
    parser.add_argument("--reasoning-weighting", choices=WEIGHTINGS, default="count",
                        help="count: sections are count-weighted; leaderboard: math-prm weighs as much as "
                             "the hep-* subsets together, as on RewardBench's leaderboard")
    parser.add_argument("--label", help="which output of a multi-output reward model to compare")
    parser.add_argument("--max-len", type=int,
                        help="longest prompt + response in tokens (default: the model's context)")
    return parser


def _check_options(args: argparse.Namespace) -> None:
    if (args.reference is None) != (args.beta is None):
        raise RewardBenchError("an implicit reward model needs both --reference and --beta (the DPO beta, "
                               "e.g. 0.1); leave both out for an explicit reward model")
    if args.beta is not None and not args.beta > 0:
        raise RewardBenchError(f"--beta must be positive, got {args.beta}")
    if args.batch_size < 1:
        raise RewardBenchError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_len is not None and args.max_len < 1:
        raise RewardBenchError(f"--max-len must be at least 1, got {args.max_len}")


def _default_mesh() -> Optional[jax.sharding.Mesh]:
    """Every device on the data axis (the pairs are split over them); None on one device."""
    return sharding_lib.make_mesh({"data": -1}) if jax.device_count() > 1 else None


def _load(args: argparse.Namespace, mesh: Optional[jax.sharding.Mesh]) -> Any:
    if args.reference is not None:
        return reward.load_implicit(args.model, args.reference, beta=args.beta, mesh=mesh,
                                    keys=("--model", "--reference"))
    return reward.load(args.model, mesh=mesh, key="--model")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_options(args)
        bench = read_bench(args.data)  # before the model: a bad file fails in a second, not after loading
        if args.subsets is not None:
            bench = bench.select([name.strip() for name in args.subsets.split(",") if name.strip()])
        mesh = _default_mesh()
        model = _load(args, mesh)
        result = evaluate(model, bench, batch_size=args.batch_size, label=args.label,
                          weighting=args.reasoning_weighting, max_len=args.max_len, mesh=mesh)
    except (ValueError, OSError) as err:  # DataError, RewardBenchError, context length, checkpoint, Hub
        print(f"error: {err}", file=sys.stderr)
        return 2
    if jax.process_index() != 0:  # every process of a multi-host run has the same results
        return 0
    where = ", ".join(bench.files)
    if args.reference is not None:
        kind = f"implicit reward of {args.model} against {args.reference}, beta {args.beta}"
    else:
        kind = f"{args.model}, output {result['label']!r}"
    print(f"RewardBench: {len(bench)} pairs from {where}; {kind}\n")
    print(format_report(result))
    if args.json:
        record: dict[str, Any] = {"model": args.model}
        if args.reference is not None:
            record.update(reference=args.reference, beta=args.beta)
        record.update(data=list(bench.files), **result)
        path = Path(args.json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        except OSError as err:
            print(f"error: --json {path}: cannot write the results: {err.strerror or err}", file=sys.stderr)
            return 2
        print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
