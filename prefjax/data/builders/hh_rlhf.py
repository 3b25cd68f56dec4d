"""``hh_rlhf``: Anthropic's helpful/harmless preference pairs (Bai et al. 2022, arXiv:2204.05862).

Source: https://huggingface.co/datasets/Anthropic/hh-rlhf, files ``<subset>/{train,test}.jsonl.gz``.
Each line is ``{"chosen": text, "rejected": text}``, where a text is a whole dialogue
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."``. Both texts repeat the
conversation and differ in the last assistant turn(s). Each text is parsed into messages
(Human -> user, Assistant -> assistant, content stripped; the ``hh_rlhf`` row format of
prefjax.data.formats, which also reads such rows from local files); the shared leading messages
become the prompt (``records``' implicit-prompt rule) and the differing tails the responses.

Configs: the four preference subsets and ``all`` (their union, per split). The
``red-team-attempts`` folder has another schema (no pairs) and is not included. Rows that fail
(an empty final reply, identical chosen/rejected, text that does not start with a Human turn) are
skipped and counted by default (``on_error``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow_datasets as tfds

from prefjax.data import readers
from prefjax.data.builders import manual
from prefjax.data.builders.base import PreferenceBuilder
from prefjax.data.formats import parse_as, parse_dialogue  # noqa: F401  (parse_dialogue re-exported: its old home)
from prefjax.data.records import DataError, LoadSummary

BASE_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
SPLITS = ("train", "test")


@dataclasses.dataclass
class HhRlhfConfig(tfds.core.BuilderConfig):
    """One subset of hh-rlhf, or all four."""

    subsets: tuple[str, ...] = SUBSETS


class HhRlhf(PreferenceBuilder):
    """Anthropic HH-RLHF preference pairs, conversations with an implicit shared prompt."""

    name = "hh_rlhf"
    HOMEPAGE = "https://huggingface.co/datasets/Anthropic/hh-rlhf"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [HhRlhfConfig(name=s, subsets=(s,), description=f"the {s} subset") for s in SUBSETS] + [
        HhRlhfConfig(name="all", subsets=SUBSETS, description="all four preference subsets")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = manual.INSTRUCTIONS.format(paths="<subset>/{train,test}.jsonl.gz")

    def _kind(self) -> str:
        return "pair"

    def _files(self) -> dict[str, list[str]]:
        return {split: [f"{subset}/{split}.jsonl.gz" for subset in self.builder_config.subsets]
                for split in SPLITS}

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        paths = manual.resolve_files(dl_manager, BASE_URL, self._files())
        return {split: self._generate_examples(split, split_paths) for split, split_paths in paths.items()}

    def _generate_examples(self, split: str, paths: list[str]):
        summary = LoadSummary()

        def examples():
            for path in paths:
                for location, row in readers.read_rows(path, format="jsonl", on_error=self.on_error,
                                                       summary=summary):
                    try:
                        # Only the two dialogues: the public files have no other columns.
                        row = {key: row.get(key) for key in ("chosen", "rejected")}
                        yield parse_as("hh_rlhf", row, location)
                    except DataError as error:
                        self._handle(error, summary)

        return self._write_examples(split, examples(), summary)
