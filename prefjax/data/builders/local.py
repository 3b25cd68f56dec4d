"""``preference_files``: a TFDS dataset from your own JSONL / JSON / Parquet / CSV files.

    path = prepare_files({"train": "prefs/train-*.jsonl", "test": "prefs/test.jsonl"},
                         data_dir="/tmp/tfds", shape="pair", fields={"prompt": "question"})
    source = prefjax.data.load_source(path, split="train")

One builder class configured by shape, not one class per shape: the shapes share reading,
validation and error handling and differ only in their stored columns, so a config
(``PreferenceFilesConfig``) carries the shape with the files and the field mapping. Its name
names the prepared dataset: ``<data_dir>/preference_files/<name>/1.0.0``; read it back with
``load_source(that_directory)`` or ``load_source("tfds:preference_files/<name>", data_dir=...)``
(TFDS restores a config it does not know from the prepared directory).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterable, Mapping, Sequence, Union

import tensorflow_datasets as tfds

from prefjax.data import readers
from prefjax.data.builders.base import PreferenceBuilder
from prefjax.data.records import KINDS, LoadSummary, check_fields

Files = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


@dataclasses.dataclass
class PreferenceFilesConfig(tfds.core.BuilderConfig):
    """Which files make which split, their shape, column mapping and format options."""

    shape: str = "pair"
    files: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)  # split -> paths / globs
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    format: str | None = None
    json_columns: Sequence[str] = ()


class PreferenceFiles(PreferenceBuilder):
    """Preference examples read from local files (see prefjax.data.records for the accepted shapes)."""

    name = "preference_files"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    # No predefined configs: a config is only meaningful with its files, and any predefined name
    # ("pair", ...) would clash with a user's dataset of that name.
    BUILDER_CONFIG_CLASS = PreferenceFilesConfig
    DEFAULT_ON_ERROR = "raise"

    def _kind(self) -> str:
        if self.builder_config is None:
            raise ValueError("preference_files needs config=PreferenceFilesConfig(name=..., shape=..., "
                             "files=...); or use prepare_files(...)")
        shape = self.builder_config.shape
        if shape not in KINDS:
            raise ValueError(f"preference_files: shape must be one of {KINDS}, got {shape!r}")
        return shape

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # local files only
        config = self.builder_config
        if not config.files:
            raise ValueError(f"preference_files/{config.name}: the config lists no files; build it with "
                             "prepare_files(...) or PreferenceFilesConfig(files={split: paths})")
        check_fields(config.fields)
        return {split: self._generate_examples(split, readers.expand_paths(paths))
                for split, paths in config.files.items()}

    def _generate_examples(self, split: str, paths: list[str]):
        config = self.builder_config
        summary = LoadSummary()
        examples = readers.read_examples(paths, shape=self._kind(), fields=config.fields,
                                         format=config.format, json_columns=config.json_columns,
                                         on_error=self.on_error, summary=summary)
        return self._write_examples(split, examples, summary)


def _as_split_files(files: Files | Mapping[str, Files]) -> dict[str, list[str]]:
    if isinstance(files, Mapping):
        return {split: readers.expand_paths(paths) for split, paths in files.items()}
    return {"train": readers.expand_paths(files)}


def _config_name(paths: Iterable[str]) -> str:
    stem = os.path.basename(next(iter(paths))).split(".")[0]
    return re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_") or "files"


def prepare_files(files: Files | Mapping[str, Files], *, data_dir: str | os.PathLike, shape: str = "auto",
                  name: str | None = None, fields: Mapping[str, str] | None = None,
                  format: str | None = None,
                  json_columns: Sequence[str] = (), on_error: str = "raise", overwrite: bool = False) -> str:
    """Prepares local files as an array_record TFDS dataset; returns its directory.

    ``files``: a path / glob / list (-> split "train") or {split: paths}. ``shape="auto"`` takes the
    shape of the first good row. ``name`` (default: the first file's stem) names the config; an
    existing prepared dataset of that name is reused unless ``overwrite``.
    """
    split_files = _as_split_files(files)
    if shape == "auto":
        first = next(iter(split_files.values()))
        example = next(readers.read_examples(first, fields=fields, format=format, json_columns=json_columns,
                                             on_error=on_error, summary=LoadSummary()), None)
        if example is None:
            raise ValueError(f"{first}: no valid rows to infer the shape from; pass shape=")
        shape = example["kind"]
    config = PreferenceFilesConfig(name=name or _config_name(next(iter(split_files.values()))), shape=shape,
                                   files=split_files, fields=dict(fields or {}), format=format,
                                   json_columns=tuple(json_columns))
    builder = PreferenceFiles(config=config, data_dir=os.fspath(data_dir), on_error=on_error)
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if overwrite:
        mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return os.fspath(builder.data_dir)
