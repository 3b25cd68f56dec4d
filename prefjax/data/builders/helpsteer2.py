"""``helpsteer2``: NVIDIA HelpSteer2 (Wang et al. 2024, arXiv:2406.08673) as pairs or ranked lists.

Source: https://huggingface.co/datasets/nvidia/HelpSteer2, files ``train.jsonl.gz`` and
``validation.jsonl.gz``. Each row rates ONE response: ``prompt``, ``response`` and five 0-4
attributes (helpfulness, correctness, coherence, complexity, verbosity). Consecutive rows share a
prompt (two responses per prompt), so the builder groups consecutive rows with the same prompt:

- config ``pairs`` (default): chosen = the response with the highest attribute score, rejected =
  the lowest; score_chosen/score_rejected hold those scores. Groups where they tie have no
  preference and are left out (counted as ``filtered["tie"]``); middle responses of groups larger
  than two are counted as ``filtered["unused_response"]``.
- config ``ranked``: all responses of a group with their scores (for listwise losses); groups whose
  scores are all equal are left out as ties.
A group with one response is counted as ``filtered["single_response"]``. The attribute is
``helpfulness`` (the dataset card's suggestion for preference pairs); make a
``Helpsteer2Config(name=..., output=..., attribute="correctness")`` for another.

Multi-turn prompts (about 29%) join turns with ``<extra_id_1>User`` / ``<extra_id_1>Assistant``
lines; they are split into messages, so every example is a conversation (``format: "chat"``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from typing import Any, Iterator

import tensorflow_datasets as tfds

from prefjax.data import readers
from prefjax.data.builders import manual
from prefjax.data.builders.base import PreferenceBuilder
from prefjax.data.formats import HELPSTEER2_ATTRIBUTES, parse_helpsteer2_prompt
from prefjax.data.records import BAD_SCORE, MISSING, WRONG_TYPE, DataError, LoadSummary, Location, parse_row

BASE_URL = "https://huggingface.co/datasets/nvidia/HelpSteer2/resolve/main"
FILES = {"train": ["train.jsonl.gz"], "validation": ["validation.jsonl.gz"]}
# The attributes and the prompt splitting are the helpsteer2 row format's (prefjax.data.formats).
ATTRIBUTES = HELPSTEER2_ATTRIBUTES
parse_prompt = parse_helpsteer2_prompt


@dataclasses.dataclass
class Helpsteer2Config(tfds.core.BuilderConfig):
    """``output``: "pair" or "ranked"; ``attribute``: the rating that orders responses."""

    output: str = "pair"
    attribute: str = "helpfulness"


@dataclasses.dataclass(frozen=True)
class _Rated:
    location: Location
    prompt: str
    response: str
    score: float


class Helpsteer2(PreferenceBuilder):
    """HelpSteer2 responses grouped by prompt and ordered by one rated attribute."""

    name = "helpsteer2"
    HOMEPAGE = "https://huggingface.co/datasets/nvidia/HelpSteer2"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [
        Helpsteer2Config(name="pairs", output="pair", description="best vs worst response by helpfulness"),
        Helpsteer2Config(name="ranked", output="ranked", description="all responses, scored by helpfulness"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = manual.INSTRUCTIONS.format(paths="train.jsonl.gz, validation.jsonl.gz")

    def _kind(self) -> str:
        config = self.builder_config
        if config.output not in ("pair", "ranked"):
            raise ValueError(f"helpsteer2/{config.name}: output must be 'pair' or 'ranked', "
                             f"got {config.output!r}")
        if config.attribute not in ATTRIBUTES:
            raise ValueError(f"helpsteer2/{config.name}: attribute must be one of {ATTRIBUTES}, "
                             f"got {config.attribute!r}")
        return config.output

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        self._kind()  # validate the config before downloading
        paths = manual.resolve_files(dl_manager, BASE_URL, FILES)
        return {split: self._generate_examples(split, split_paths) for split, split_paths in paths.items()}

    def _rated_rows(self, paths: list[str], summary: LoadSummary) -> Iterator[_Rated]:
        attribute = self.builder_config.attribute
        for path in paths:
            rows = readers.read_rows(path, format="jsonl", on_error=self.on_error, summary=summary)
            for location, row in rows:
                try:
                    yield _rate(row, location, attribute)
                except DataError as error:
                    self._handle(error, summary)

    def _generate_examples(self, split: str, paths: list[str]):
        summary = LoadSummary()

        def examples():
            groups = itertools.groupby(self._rated_rows(paths, summary), key=lambda rated: rated.prompt)
            for _, group in groups:
                rated = list(group)
                try:
                    example = self._example(rated, summary)
                except DataError as error:
                    self._handle(error, summary)
                    continue
                if example is not None:
                    yield example

        return self._write_examples(split, examples(), summary)

    def _example(self, rated: list[_Rated], summary: LoadSummary) -> dict[str, Any] | None:
        if len(rated) < 2:
            summary.record_filtered("single_response")
            return None
        scores = [r.score for r in rated]
        if min(scores) == max(scores):
            summary.record_filtered("tie")
            return None
        first = rated[0]
        prompt = parse_prompt(first.prompt)
        if self.builder_config.output == "ranked":
            row = {"prompt": prompt, "responses": [r.response for r in rated], "scores": scores}
            return parse_row(row, "ranked", first.location)
        best = max(rated, key=lambda r: r.score)  # first of the best, first of the worst
        worst = min(rated, key=lambda r: r.score)
        if len(rated) > 2:
            summary.record_filtered("unused_response", len(rated) - 2)
        row = {"prompt": prompt, "chosen": best.response, "rejected": worst.response,
               "score_chosen": best.score, "score_rejected": worst.score}
        return parse_row(row, "pair", first.location)


def _rate(row: dict, location: Location, attribute: str) -> _Rated:
    for key in ("prompt", "response"):
        if row.get(key) is None:
            raise DataError(location, key, "missing", MISSING)
        if not isinstance(row[key], str):
            raise DataError(location, key, f"must be text, got {type(row[key]).__name__}", WRONG_TYPE)
    score = row.get(attribute)
    if score is None:
        raise DataError(location, attribute, "missing", MISSING)
    if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score):
        raise DataError(location, attribute, f"must be a finite number, got {score!r}", BAD_SCORE)
    return _Rated(location, row["prompt"], row["response"], float(score))
