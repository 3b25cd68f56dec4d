"""``ultrafeedback_binarized``: UltraFeedback pairs as binarized by Hugging Face H4 (Zephyr).

Source: https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized, Parquet files
``data/{train,test}_prefs-00000-of-00001.parquet`` (splits "train" and "test" here). Columns used:
``chosen`` / ``rejected`` (message lists ``[{"content", "role"}]`` that both start with the user
prompt) and ``score_chosen`` / ``score_rejected`` (GPT-4 ratings, kept as the example's scores).
The ``prompt`` column is not passed on: the shared first message is the prompt, so a prompt text
that differs from the message (whitespace) cannot be counted twice (the ``ultrafeedback_binarized``
row format of prefjax.data.formats, which also reads such rows from local files). Pairs with equal
scores are kept
(their scores tell); rows with identical or empty responses are skipped and counted by default.
"""

from __future__ import annotations

from typing import Any

import tensorflow_datasets as tfds

from prefjax.data import readers
from prefjax.data.builders import manual
from prefjax.data.builders.base import PreferenceBuilder
from prefjax.data.formats import parse_as
from prefjax.data.records import DataError, LoadSummary

BASE_URL = "https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized/resolve/main"
FILES = {"train": ["data/train_prefs-00000-of-00001.parquet"],
         "test": ["data/test_prefs-00000-of-00001.parquet"]}
_COLUMNS = ("chosen", "rejected", "score_chosen", "score_rejected")


class UltrafeedbackBinarized(PreferenceBuilder):
    """UltraFeedback binarized preference pairs (chat) with GPT-4 scores."""

    name = "ultrafeedback_binarized"
    HOMEPAGE = "https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = manual.INSTRUCTIONS.format(
        paths=", ".join(path for paths in FILES.values() for path in paths))

    def _kind(self) -> str:
        return "pair"

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        paths = manual.resolve_files(dl_manager, BASE_URL, FILES)
        return {split: self._generate_examples(split, split_paths) for split, split_paths in paths.items()}

    def _generate_examples(self, split: str, paths: list[str]):
        summary = LoadSummary()

        def examples():
            for path in paths:
                for location, row in readers.read_rows(path, format="parquet", on_error=self.on_error,
                                                       summary=summary):
                    try:
                        row = {key: row.get(key) for key in _COLUMNS}
                        yield parse_as("ultrafeedback_binarized", row, location)
                    except DataError as error:
                        self._handle(error, summary)

        return self._write_examples(split, examples(), summary)
