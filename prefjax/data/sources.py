"""``load_source``: a random-access source of canonical preference examples.

A source has ``len(source)`` and ``source[i] -> canonical dict`` (prefjax.data.records), the
protocol grain's ``RandomAccessDataSource`` expects. Three ways in:

    # (a) a prepared TFDS dataset directory (array_record), e.g. what prepare_files() returned
    source = load_source("/tmp/tfds/preference_files/prefs/1.0.0", split="train")
    # (a') a registered builder by name: prepared under data_dir (prepare=True builds it first;
    #      manual_dir= uses local copies of the public files instead of downloading them)
    source = load_source("tfds:hh_rlhf/helpful-base", data_dir="/tmp/tfds", split="test")
    # (b) local files read straight into memory: small data, colabs, tests
    source = load_source(["prefs.jsonl", "more/*.parquet"], shape="pair", on_error="skip")
    print(source.summary)                      # rows read, examples, skipped rows per reason
    # (c) a Hugging Face Hub dataset's files of one config and split (prefjax.data.hub), read as (b)
    source = load_source("hf:HuggingFaceH4/ultrafeedback_binarized", split="train_prefs[:1000]")

Reading TFDS data returns ``str`` (never bytes) and plain floats/bools/lists. File sources hold
their examples in memory; for large data prepare a TFDS dataset once with
``prefjax.data.builders.prepare_files`` (TFDS is imported only when a TFDS source is asked for).
"""

from __future__ import annotations

import copy
import operator
import os
import re
from typing import Any, Iterable, Mapping, Sequence, Union

from prefjax.data import readers
from prefjax.data.records import LoadSummary, check_on_error

PathLike = Union[str, os.PathLike]
TFDS_PREFIX = "tfds:"
HUB_PREFIX = "hf:"  # prefjax.data.hub (imported when used: huggingface_hub takes a while to import)
# "train", "train[:1000]", "train[10%:20%]", "train[-500:]": a split name, optionally sliced.
_SPLIT = re.compile(r"^(?P<name>[\w.-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


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

    def sliced(self, start: int | None, stop: int | None) -> "ListSource":
        """Examples ``[start:stop]`` (Python slicing); ``summary`` still describes what was read."""
        return ListSource(self._examples[start:stop], self.summary)


def parse_split(split: str, key: str = "data.split") -> tuple[str, tuple[str | None, str | None] | None]:
    """``"train[:10%]"`` -> ``("train", (None, "10%"))``; ``"train"`` -> ``("train", None)``."""
    match = _SPLIT.match(split.strip())
    if match is None:
        raise ValueError(f"{key}={split!r}: expected a split name, optionally sliced as in 'train[:1000]', "
                         "'train[10%:20%]' or 'train[-500:]' (Hub and file sources take no other split syntax)")
    bounds = None if "[" not in split else (match["start"], match["stop"])
    return match["name"], bounds


def _bound(text: str | None, length: int) -> int | None:
    if text is None:
        return None
    if text.endswith("%"):  # a percentage of the split, rounded to the nearest example as TFDS does
        return round(length * int(text[:-1]) / 100)
    return int(text)


def slice_split(source: ListSource, bounds: tuple[str | None, str | None] | None) -> ListSource:
    """``source`` cut to ``parse_split``'s bounds (None: all of it)."""
    if bounds is None:
        return source
    return source.sliced(_bound(bounds[0], len(source)), _bound(bounds[1], len(source)))


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


def from_tfds_builder(name: str, *, data_dir: PathLike | None = None, split: str = "train", prepare: bool = False,
                      manual_dir: PathLike | None = None, on_error: str | None = None) -> TfdsSource:
    """A registered builder ("hh_rlhf/helpful-base", "preference_files/<name>", ...) under data_dir
    (None: TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets).

    ``prepare=True`` builds it first if needed (downloading unless ``manual_dir`` holds the files);
    otherwise an unprepared dataset is an error that says how to prepare it.
    """
    import tensorflow_datasets as tfds

    import prefjax.data.builders  # noqa: F401  (registers the builders with TFDS)

    if data_dir is None:
        data_dir = tfds.core.constants.get_default_data_dir()
    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        if not prepare:
            raise FileNotFoundError(f"{name} is not prepared under {data_dir}; pass prepare=True (and "
                                    "manual_dir= to use local copies of its files), or set data.data_dir to "
                                    "where it was prepared")
        if on_error is not None:
            # Set on the instance rather than passed to tfds.builder: a read-only builder restored from
            # a prepared directory takes no such argument, and the policy only matters while preparing.
            check_on_error(on_error)
            builder.on_error = on_error
        manual = None if manual_dir is None else os.fspath(manual_dir)
        config = tfds.download.DownloadConfig(manual_dir=manual)
        builder.download_and_prepare(download_config=config)
    return TfdsSource(builder, split)


def from_hub(spec: str, *, split: str = "train", key: str = "data.source", **read: Any) -> ListSource:
    """A Hub dataset's config and split (``hf:<owner>/<name>[@revision][:<config>]``, prefjax.data.hub),
    sliced as ``split`` says ("train[:1000]"); ``read`` goes to :func:`from_files`."""
    from prefjax.data import hub  # pylint: disable=import-outside-toplevel

    name, bounds = parse_split(split, key="data.eval_split" if key.endswith("eval_source") else "data.split")
    return slice_split(from_files(hub.data_files(spec, name, key=key), **read), bounds)


def _is_tfds_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json"))


def _check_prepared(source: TfdsSource, spec: str, key: str, shape: str, fields: Mapping[str, str] | None,
                    row_format: str) -> TfdsSource:
    """A prepared dataset is already canonical: shape is checked, column mappings cannot apply."""
    if shape != "auto" and source.kind != shape:
        raise ValueError(f"{key}={spec!r} holds {source.kind!r} examples, not {shape!r}")
    mapped = {k: v for k, v in (fields or {}).items() if v}
    if mapped:
        raise ValueError(f"{key}={spec!r}: a prepared TFDS dataset's columns were mapped when it was prepared; "
                         f"data.fields {mapped} cannot apply (prepare it with prefjax.data.builders.prepare_files("
                         "fields=...), or clear data.fields)")
    if row_format != "auto":
        raise ValueError(f"{key}={spec!r}: a prepared TFDS dataset holds canonical examples; the row format "
                         f"{row_format!r} applied when it was prepared (set data.format='auto')")
    return source


def load_source(source: PathLike | Iterable[PathLike], *, split: str = "train",
                data_dir: PathLike | None = None, prepare: bool = False, manual_dir: PathLike | None = None,
                shape: str = "auto", fields: Mapping[str, str] | None = None, format: str | None = None,
                json_columns: Sequence[str] = (), on_error: str | None = None,
                row_format: str = "auto", key: str = "data.source") -> ListSource | TfdsSource:
    """A random-access source from a TFDS directory, ``"tfds:<builder>[/<config>]"``, a Hub dataset
    ``"hf:<owner>/<name>[@revision][:<config>]"`` or local files. ``key`` names the config key in errors.

    - TFDS directory / name: ``split`` (TFDS split syntax, e.g. "train[:10%]"); for a name,
      ``data_dir`` (None: TFDS's default), ``prepare``, ``manual_dir`` and ``on_error`` (used when
      preparing; None = the builder's default: "skip" for the public datasets, "raise" for local
      files) apply. ``shape`` is checked against the prepared examples; ``fields`` and
      ``row_format`` applied when preparing and are refused here.
    - Hub dataset: ``split`` names the split ("train", or sliced: "train[:1000]", "train[:10%]");
      its files are then read like local files.
    - files (a path, glob or list of them): ``shape`` ("auto", "pair", "unpaired", "ranked"),
      ``fields`` (canonical name -> column), ``format``, ``json_columns``, ``row_format`` and
      ``on_error`` ("raise", the default, or "skip") apply; the result is an in-memory ListSource.
      ``split`` does not apply (files have none).
    """
    read = dict(shape=shape, fields=fields, format=format, json_columns=json_columns, on_error=on_error or "raise",
                row_format=row_format)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith(HUB_PREFIX):
            return from_hub(text, split=split, key=key, **read)
        if text.startswith(TFDS_PREFIX):
            prepared = from_tfds_builder(text[len(TFDS_PREFIX):], data_dir=data_dir, split=split, prepare=prepare,
                                         manual_dir=manual_dir, on_error=on_error)
            return _check_prepared(prepared, text, key, shape, fields, row_format)
        if os.path.isdir(text):
            if not _is_tfds_directory(text):
                raise FileNotFoundError(f"{text}: a directory but not a prepared TFDS dataset (no "
                                        "dataset_info.json); pass data files or a glob instead")
            return _check_prepared(from_tfds_directory(text, split=split), text, key, shape, fields, row_format)
    return from_files(source, **read)
