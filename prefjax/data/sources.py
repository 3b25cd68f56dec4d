"""``load_source``: a random-access source of canonical preference examples.

A source has ``len(source)`` and ``source[i] -> canonical dict`` (docs/data_contract.md), the
protocol grain's ``RandomAccessDataSource`` expects. Three ways in:

    # (a) a prepared TFDS dataset directory (array_record), e.g. what prepare_files() returned
    source = load_source("/tmp/tfds/preference_files/prefs/1.0.0", split="train")
    # (a') a registered builder by name: prepared under data_dir (prepare=True builds it first;
    #      manual_dir= uses local copies of the public files instead of downloading them)
    source = load_source("tfds:hh_rlhf/helpful-base", data_dir="/tmp/tfds", split="test")
    # (b) local files read straight into memory: small data, colabs, tests
    source = load_source(["prefs.jsonl", "more/*.parquet"], shape="pair", on_error="skip")
    print(source.summary)                      # rows read, examples, skipped rows per reason

Reading TFDS data returns ``str`` (never bytes) and plain floats/bools/lists. File sources hold
their examples in memory; for large data prepare a TFDS dataset once with
``prefjax.data.builders.prepare_files`` (TFDS is imported only when a TFDS source is asked for).
"""

from __future__ import annotations

import copy
import operator
import os
from typing import Any, Iterable, Mapping, Sequence, Union

from prefjax.data import readers
from prefjax.data.records import LoadSummary, check_on_error

PathLike = Union[str, os.PathLike]
TFDS_PREFIX = "tfds:"


class ListSource:
    """Canonical examples held in memory. ``summary`` tells what loading skipped."""

    def __init__(self, examples: Sequence[dict[str, Any]], summary: LoadSummary | None = None):
        self._examples = list(examples)
        self.summary = summary if summary is not None else LoadSummary(rows=len(self._examples),
                                                                       examples=len(self._examples))

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # A deep copy: a transform that edits its input must not change the source.
        return copy.deepcopy(self._examples[operator.index(index)])

    def __repr__(self) -> str:
        kinds = sorted({e["kind"] for e in self._examples})
        return f"ListSource({len(self)} examples, kinds={kinds})"


def _position(index: int, length: int) -> int:
    """Python indexing (negative counts from the end) with IndexError, which array_record lacks."""
    position = operator.index(index)
    position += length if position < 0 else 0
    if not 0 <= position < length:
        raise IndexError(f"index {index} out of range for {length} examples")
    return position


class TfdsSource:
    """A prepared TFDS preference dataset split, decoded to canonical examples on access.

    ``load_summary``: the skip/filter counts recorded when the split was prepared (a dict), if any.
    """

    def __init__(self, builder: Any, split: str):
        # Imported here: prefjax.data.builders imports (and registers with) TFDS, which file sources skip.
        from prefjax.data.builders import codec

        self._decode = codec.decode
        self.directory, self.split = os.fspath(builder.data_dir), split
        self.kind = codec.kind_of(builder.info.features.keys())
        self.load_summary = dict(builder.info.metadata or {}).get("load_summary", {}).get(str(split))
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._decode(self._source[_position(index, len(self))], self.kind)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        # Batched reads (grain uses them when present) go to array_record in one call.
        records = self._source.__getitems__([_position(i, len(self)) for i in indices])
        return [self._decode(record, self.kind) for record in records]

    def __repr__(self) -> str:
        return f"TfdsSource({self.directory!r}, split={self.split!r}, {len(self)} {self.kind} examples)"


def from_files(files: PathLike | Iterable[PathLike], *, shape: str = "auto",
               fields: Mapping[str, str] | None = None, format: str | None = None,
               json_columns: Sequence[str] = (), on_error: str = "raise", row_format: str = "auto") -> ListSource:
    """Reads and validates local files into a ListSource (see prefjax.data.readers for file formats;
    ``row_format`` is the rows' layout, prefjax.data.formats)."""
    summary = LoadSummary()
    examples = list(readers.read_examples(files, shape=shape, fields=fields, format=format,
                                          json_columns=json_columns, on_error=on_error, summary=summary,
                                          row_format=row_format))
    return ListSource(examples, summary)


def from_tfds_directory(directory: PathLike, *, split: str = "train") -> TfdsSource:
    """A prepared dataset directory (the one holding dataset_info.json)."""
    import tensorflow_datasets as tfds

    return TfdsSource(tfds.builder_from_directory(os.fspath(directory)), split)


def from_tfds_builder(name: str, *, data_dir: PathLike, split: str = "train", prepare: bool = False,
                      manual_dir: PathLike | None = None, on_error: str | None = None) -> TfdsSource:
    """A registered builder ("hh_rlhf/helpful-base", "preference_files/<name>", ...) under data_dir.

    ``prepare=True`` builds it first if needed (downloading unless ``manual_dir`` holds the files);
    otherwise an unprepared dataset is an error that says how to prepare it.
    """
    import tensorflow_datasets as tfds

    import prefjax.data.builders  # noqa: F401  (registers the builders with TFDS)

    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        if not prepare:
            raise FileNotFoundError(f"{name} is not prepared under {data_dir}; pass prepare=True (and "
                                    "manual_dir= to use local copies of its files)")
        if on_error is not None:
            # Set on the instance rather than passed to tfds.builder: a read-only builder restored from
            # a prepared directory takes no such argument, and the policy only matters while preparing.
            check_on_error(on_error)
            builder.on_error = on_error
        manual = None if manual_dir is None else os.fspath(manual_dir)
        config = tfds.download.DownloadConfig(manual_dir=manual)
        builder.download_and_prepare(download_config=config)
    return TfdsSource(builder, split)


def _is_tfds_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json"))


def load_source(source: PathLike | Iterable[PathLike], *, split: str = "train",
                data_dir: PathLike | None = None, prepare: bool = False, manual_dir: PathLike | None = None,
                shape: str = "auto", fields: Mapping[str, str] | None = None, format: str | None = None,
                json_columns: Sequence[str] = (), on_error: str | None = None,
                row_format: str = "auto") -> ListSource | TfdsSource:
    """A random-access source from a TFDS directory, ``"tfds:<builder>[/<config>]"`` or local files.

    - TFDS directory / name: ``split`` (TFDS split syntax, e.g. "train[:10%]"); for a name,
      ``data_dir`` (required), ``prepare``, ``manual_dir`` and ``on_error`` (used when preparing;
      None = the builder's default: "skip" for the public datasets, "raise" for local files) apply.
    - files (a path, glob or list of them): ``shape`` ("auto", "pair", "unpaired", "ranked"),
      ``fields`` (canonical name -> column), ``format``, ``json_columns`` and ``on_error``
      ("raise", the default, or "skip") apply; the result is an in-memory ListSource.
    """
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith(TFDS_PREFIX):
            if data_dir is None:
                raise ValueError(f"{text}: a builder name needs data_dir= (where it is, or will be, "
                                 "prepared)")
            return from_tfds_builder(text[len(TFDS_PREFIX):], data_dir=data_dir, split=split, prepare=prepare,
                                     manual_dir=manual_dir, on_error=on_error)
        if os.path.isdir(text):
            if not _is_tfds_directory(text):
                raise FileNotFoundError(f"{text}: a directory but not a prepared TFDS dataset (no "
                                        "dataset_info.json); pass data files or a glob instead")
            return from_tfds_directory(text, split=split)
    return from_files(source, shape=shape, fields=fields, format=format, json_columns=json_columns,
                      on_error=on_error or "raise", row_format=row_format)
