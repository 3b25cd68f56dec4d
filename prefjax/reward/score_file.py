"""Score a preference or completion file with a reward model; write each row back with its rewards.

    python -m prefjax.reward.score_file --model out/rm --input prefs.jsonl --output scored.jsonl
    python -m prefjax.reward.score_file --model out/dpo --reference out/sft --beta 0.1 \\
        --input prefs.parquet --output scored.jsonl --batch-size 64 --normalize

--model is a reward model folder (*ForSequenceClassification, e.g. the trainer's export) or a Hub
id; with --reference and --beta, a DPO policy scored by its implicit reward beta * log(pi / ref).
--input is any file prefjax.data reads (.jsonl, .json, .parquet, .csv, .tsv; any row format it
knows: TRL pairs, sharegpt, messages, alpaca, hh_rlhf, UltraFeedback, completions with a label,
ranked or rated rows; --format names one when detection cannot). Each row is rendered exactly as
the trainer renders it (prefjax.reward.scorer).

--output (JSON Lines) holds every input row, unchanged and in order, plus its rewards:

    pair rows                reward_chosen, reward_rejected, reward_margin (chosen - rejected)
    completion / rated rows  reward
    ranked rows              rewards (a list, one per response, in the row's order)

A reward model with several outputs (L > 1, e.g. HelpSteer2 attributes) writes one field per
label instead, suffixed with its name: reward_chosen_helpfulness, reward_rejected_helpfulness,
reward_margin_helpfulness, ..., reward_helpfulness, rewards_helpfulness. One summary line goes
to stdout. Bad input (a missing field: file, line and field; a row longer than the model's
context; an unreadable model folder) prints one or two lines to stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from prefjax import sharding as sharding_lib
from prefjax.data import formats, readers
from prefjax.reward import scorer
from prefjax.reward.model import load, load_implicit

EXIT_USAGE = 2


def reward_fields(kind: str, rewards: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """The fields an example of `kind` with rewards [K, L] gets (see the module docstring)."""
    suffixes = [""] if len(labels) == 1 else [f"_{label}" for label in labels]
    out: dict[str, Any] = {}
    for l, suffix in enumerate(suffixes):
        column = [float(v) for v in rewards[:, l]]
        if kind == "pair":
            out[f"reward_chosen{suffix}"] = column[0]
            out[f"reward_rejected{suffix}"] = column[1]
            out[f"reward_margin{suffix}"] = column[0] - column[1]
        elif kind == "ranked":
            out[f"rewards{suffix}"] = column
        else:  # one response: unpaired (completion + label) or rated
            out[f"reward{suffix}"] = column[0]
    return out


def summary(path: str, kind: str, per_example: Sequence[np.ndarray], labels: Sequence[str], seconds: float,
            output: str) -> str:
    """One line: rows and responses scored, time, mean rewards (and pair accuracy), output file."""
    responses = sum(len(r) for r in per_example)
    head = (f"{path}: scored {len(per_example)} {kind} rows ({responses} responses) in {seconds:.1f} s "
            f"-> {output}")
    if not per_example:
        return head
    stacked = np.stack(per_example) if kind != "ranked" else None
    parts = []
    for l, label in enumerate(labels):
        name = "" if len(labels) == 1 else f" {label}"
        if stacked is not None and kind == "pair":
            chosen, rejected = stacked[:, 0, l], stacked[:, 1, l]
            parts.append(f"mean reward{name} chosen {chosen.mean():.4g}, rejected {rejected.mean():.4g}, "
                         f"chosen > rejected on {np.mean(chosen > rejected):.1%}")
        else:
            values = np.concatenate([r[:, l] for r in per_example])
            parts.append(f"mean reward{name} {values.mean():.4g} (std {values.std():.4g})")
    return f"{head}; " + "; ".join(parts)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prefjax.reward.score_file",
                                     description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--model", required=True, help="reward model folder or Hub id (with --reference: the policy)")
    parser.add_argument("--reference", help="the reference model: score --model by its implicit reward")
    parser.add_argument("--beta", type=float, help="the implicit reward's beta (the DPO beta of the policy)")
    parser.add_argument("--input", required=True, help="preference or completion file (.jsonl/.json/.parquet/.csv)")
    parser.add_argument("--output", required=True, help="JSON Lines file to write the rows with rewards to")
    parser.add_argument("--batch-size", type=int, default=scorer.DEFAULT_BATCH_SIZE, help="rows per program call")
    parser.add_argument("--max-len", type=int, help="longest prompt + response (default: the model's context)")
    parser.add_argument("--normalize", action="store_true", help="apply the model's stored reward mean and std")
    parser.add_argument("--format", default=formats.AUTO, help="the rows' format (default: detected), e.g. sharegpt")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.reference is None) != (args.beta is None):
        parser.error("--reference and --beta go together: the implicit reward is beta * log(policy / reference)")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if os.path.abspath(args.output) == os.path.abspath(args.input):
        parser.error("--output is the input file; write the scored rows to another file")
    try:
        formats.check_format(args.format)
    except ValueError as err:
        parser.error(f"--format: {err}")


def _default_mesh() -> jax.sharding.Mesh | None:
    """Every device on the data axis (rows split over them); None on one device."""
    return sharding_lib.make_mesh({"data": -1}) if jax.device_count() > 1 else None


def run(args: argparse.Namespace) -> str:
    """Scores args.input into args.output; returns the summary line. Raises ValueError / OSError on bad input."""
    rows = list(readers.read_rows(args.input))  # file-level and row-level read errors name file and line
    examples = list(formats.iter_parse(iter(rows), row_format=args.format))
    mesh = _default_mesh()
    start = time.perf_counter()
    if args.reference is not None:
        model = load_implicit(args.model, args.reference, beta=args.beta, mesh=mesh, keys=("--model", "--reference"))
    else:
        model = load(args.model, mesh=mesh, key="--model")
    per_example = scorer.score_examples(model, examples, batch_size=args.batch_size, max_len=args.max_len,
                                        normalize=args.normalize, mesh=mesh)
    seconds = time.perf_counter() - start
    kind = examples[0]["kind"] if examples else "no"
    if jax.process_index() == 0:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            for (_, row), example, rewards in zip(rows, examples, per_example):
                out = dict(row, **reward_fields(example["kind"], rewards, model.labels))
                f.write(json.dumps(out, ensure_ascii=False, default=str) + "\n")
    return summary(args.input, kind, per_example, model.labels, seconds, args.output)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        line = run(args)
    except (ValueError, OSError) as err:  # DataError, ContextLengthError, checkpoint errors: all name the culprit
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
