"""``hh_rlhf``: Anthropic's helpful/harmless preference pairs (Bai et al. 2022, arXiv:2204.05862).

Source: https://huggingface.co/datasets/Anthropic/hh-rlhf, files ``<subset>/{train,test}.jsonl.gz``.
Each line is ``{"chosen": text, "rejected": text}``, where a text is a whole dialogue
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."``. Both texts repeat the
conversation and differ in the last assistant turn(s). Each text is parsed into messages
(Human -> user, Assistant -> assistant, content stripped); the shared leading messages become
the prompt (``records``' implicit-prompt rule) and the differing tails the responses.

Configs: the four preference subsets and ``all`` (their union, per split). The
``red-team-attempts`` folder has another schema (no pairs) and is not included. Rows that fail
(an empty final reply, identical chosen/rejected, text that does not start with a Human turn) are
skipped and counted by default (``on_error``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import tensorflow_datasets as tfds

from prefjax.data import readers
from prefjax.data.builders import manual
from prefjax.data.builders.base import PreferenceBuilder
from prefjax.data.records import BAD_ROLE, MISSING, WRONG_TYPE, DataError, Location, LoadSummary, parse_row

BASE_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
SPLITS = ("train", "test")
_ROLES = {"Human": "user", "Assistant": "assistant"}
# A turn header at the very start or after a blank line. Some rows start without the "\n\n".
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def parse_dialogue(text: Any, location: Location, field: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{"role": "user", ...}, {"role": "assistant", ...}]``."""
    if text is None:
        raise DataError(location, field, "missing", MISSING)
    if not isinstance(text, str):
        raise DataError(location, field, f"must be dialogue text, got {type(text).__name__}", WRONG_TYPE)
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(location, field, "dialogue text must start with a 'Human:' turn", BAD_ROLE)
    # parts = ["", role, content, role, content, ...]
    turns = zip(parts[1::2], parts[2::2])
    return [{"role": _ROLES[role], "content": content.strip()} for role, content in turns]


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
                        messages = {key: parse_dialogue(row.get(key), location, key)
                                    for key in ("chosen", "rejected")}
                        yield parse_row(messages, "pair", location)
                    except DataError as error:
                        self._handle(error, summary)

        return self._write_examples(split, examples(), summary)
