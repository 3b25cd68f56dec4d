"""Local files -> located raw rows, and -> canonical examples.

    for location, row in read_rows("prefs.jsonl"):            # (Location, dict), file order
        ...
    summary = LoadSummary()
    examples = list(read_examples(["a.jsonl", "b/*.parquet"], shape="pair",
                                  on_error="skip", summary=summary))

Formats, from the file name (a trailing ``.gz`` is ignored; gzip is detected from the content):
``.jsonl``/``.ndjson`` (one object per line), ``.json`` (an array of objects; a ``.json`` file
that does not start with ``[`` is read as JSONL, as Hugging Face exports it), ``.parquet`` (via
pyarrow, which tensorflow-datasets already requires), ``.csv`` and ``.tsv`` (header row; all cells
are text, so list-valued columns such as message lists must be named in ``json_columns``).

Errors. Row-level problems (invalid UTF-8 or malformed JSON on a JSONL line, a non-object row, a
CSV row with the wrong number of cells, a bad JSON cell) follow ``on_error``: "raise" (default)
raises :class:`~prefjax.data.records.DataError`; "skip" counts the row in the ``LoadSummary`` and
goes on. File-level problems (a JSON array or Parquet file that cannot be parsed, a CSV without
header) always raise: there is no row to skip.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import logging
import os
import re
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Sequence, Union

from prefjax.data.formats import iter_parse
from prefjax.data.records import (BAD_FILE, BAD_JSON, BAD_ROW, BAD_UTF8, DataError, Location, LoadSummary,
                                  check_on_error, handle_error)

PathLike = Union[str, os.PathLike]
FORMATS = ("jsonl", "json", "parquet", "csv", "tsv")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
             ".csv": "csv", ".tsv": "tsv"}
_GZIP_MAGIC = b"\x1f\x8b"
# Lone surrogates are what errors="surrogateescape" turns invalid UTF-8 bytes into.
_SURROGATES = re.compile("[\udc80-\udcff]")

log = logging.getLogger(__name__)

RawItem = tuple[Location, Union[dict, DataError]]


def _open_binary(path: str) -> BinaryIO:
    """The file's bytes, transparently gunzipped when it starts with the gzip magic number."""
    f = open(path, "rb")
    if f.read(2) == _GZIP_MAGIC:
        f.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    f.seek(0)
    return f


def detect_format(path: PathLike) -> str:
    """The reader for ``path``, from its suffix (see the module docstring)."""
    path = os.fspath(path)
    name = path[:-3] if path.endswith(".gz") else path
    fmt = _SUFFIXES.get(os.path.splitext(name)[1].lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown data file type; expected one of {sorted(_SUFFIXES)} "
                         "(optionally .gz), or pass format=")
    if fmt == "json":
        with _open_binary(path) as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        fmt = "json" if head.startswith(b"[") else "jsonl"
    return fmt


# ---------------------------------------------------------------------------------------------
# Per-format readers: yield (location, row dict or the DataError for that row)
# ---------------------------------------------------------------------------------------------

def _jsonl_items(path: str) -> Iterator[RawItem]:
    with _open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            location = Location(path, number, "line")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield location, DataError(location, None, f"invalid UTF-8 at byte {e.start + 1} of the line",
                                          BAD_UTF8)
                continue
            if number == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue  # blank lines separate nothing and are not rows
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                detail = f"malformed JSON: {e.msg} (column {e.colno})"
                yield location, DataError(location, None, detail, BAD_JSON)
                continue
            if not isinstance(row, dict):
                yield location, DataError(location, None, "a JSONL line must hold one JSON object, got "
                                          f"{type(row).__name__}", BAD_ROW)
                continue
            yield location, row


def _decode_whole(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(Location(path, line, "line"), None, "invalid UTF-8", BAD_UTF8) from None


def _json_array_items(path: str) -> Iterator[RawItem]:
    with _open_binary(path) as f:
        text = _decode_whole(path, f.read())
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(Location(path, e.lineno, "line"), None, f"malformed JSON: {e.msg} (column {e.colno})",
                        BAD_JSON) from None
    if not isinstance(rows, list):
        raise DataError(Location(path), None, f"a .json file must hold an array of objects, got "
                        f"{type(rows).__name__} (JSON Lines files should be named .jsonl)", BAD_FILE)
    for index, row in enumerate(rows):
        location = Location(path, index, "index")
        if not isinstance(row, dict):
            yield location, DataError(location, None, f"an array element must be a JSON object, got "
                                      f"{type(row).__name__}", BAD_ROW)
            continue
        yield location, row


def _parquet_items(path: str) -> Iterator[RawItem]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from e
    try:
        parquet_file = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(Location(path), None, f"not a readable Parquet file: {e}", BAD_FILE) from None
    number = 0
    # Batches keep memory bounded on big files; to_pylist gives plain str/float/list/dict values.
    for batch in parquet_file.iter_batches(batch_size=512):
        for row in batch.to_pylist():
            number += 1
            yield Location(path, number, "row"), row


def _csv_items(path: str, delimiter: str) -> Iterator[RawItem]:
    with _open_binary(path) as f:
        # surrogateescape keeps invalid bytes as lone surrogates so the bad row (not the file) is reported.
        text = f.read().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(Location(path), None, "empty file: a CSV needs a header row", BAD_FILE)
        if any(_SURROGATES.search(h) for h in header):
            raise DataError(Location(path, 1, "line"), None, "invalid UTF-8 in the header", BAD_UTF8)
        duplicates = sorted({h for h in header if header.count(h) > 1})
        if duplicates:
            raise DataError(Location(path, 1, "line"), None, f"duplicate header columns {duplicates}",
                            BAD_FILE)
        number, next_line = 0, reader.line_num + 1
        for cells in reader:
            start, next_line = next_line, reader.line_num + 1
            if not cells:
                continue  # a blank line is not a row
            number += 1
            location = Location(path, number, "row", line=start)
            if len(cells) != len(header):
                yield location, DataError(location, None, f"has {len(cells)} cells, the header has "
                                          f"{len(header)}", BAD_ROW)
                continue
            bad = [h for h, cell in zip(header, cells) if _SURROGATES.search(cell)]
            if bad:
                yield location, DataError(location, bad[0], "invalid UTF-8", BAD_UTF8)
                continue
            yield location, dict(zip(header, cells))
    except csv.Error as e:
        location = Location(path, reader.line_num, "line")
        raise DataError(location, None, f"malformed CSV: {e}", BAD_FILE) from None


def _raw_items(path: str, fmt: str) -> Iterator[RawItem]:
    if fmt == "jsonl":
        return _jsonl_items(path)
    if fmt == "json":
        return _json_array_items(path)
    if fmt == "parquet":
        return _parquet_items(path)
    if fmt in ("csv", "tsv"):
        return _csv_items(path, "," if fmt == "csv" else "\t")
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def _decode_json_cells(location: Location, row: dict, json_columns: Sequence[str]) -> dict:
    """Decodes JSON-encoded text cells (e.g. message lists in a CSV); empty cells stay empty."""
    for column in json_columns:
        value = row.get(column)
        if isinstance(value, str) and value.strip():
            try:
                row[column] = json.loads(value)
            except json.JSONDecodeError as e:
                raise DataError(location, column, f"malformed JSON in a JSON column: {e.msg} (character "
                                f"{e.pos + 1})", BAD_JSON) from None
    return row


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def expand_paths(paths: PathLike | Iterable[PathLike]) -> list[str]:
    """A path, a glob pattern or a list of them -> existing file paths (globs sorted)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for path in map(os.fspath, paths):
        if glob.has_magic(path):
            matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"no file matches {path!r}")
            out.extend(matches)
        elif os.path.isfile(path):
            out.append(path)
        else:
            hint = " (it is a directory)" if os.path.isdir(path) else ""
            raise FileNotFoundError(f"{path}: no such file{hint}")
    if not out:
        raise ValueError("no data files given")
    return out


def read_rows(path: PathLike, *, format: str | None = None, json_columns: Sequence[str] = (),
              on_error: str = "raise", summary: LoadSummary | None = None) -> Iterator[tuple[Location, dict]]:
    """Yields (location, raw row dict) for each row of one file, in file order.

    Bad rows raise DataError, or with ``on_error="skip"`` are counted in ``summary`` (required then).
    ``summary.rows`` counts every row read, good or bad.
    """
    check_on_error(on_error)
    if on_error == "skip" and summary is None:
        raise ValueError("on_error='skip' needs a LoadSummary to count the skipped rows in")
    path = os.fspath(path)
    for location, item in _raw_items(path, format or detect_format(path)):
        if summary is not None:
            summary.rows += 1
        try:
            if isinstance(item, DataError):
                raise item
            yield location, _decode_json_cells(location, item, json_columns)
        except DataError as error:
            handle_error(error, on_error, summary)


def read_examples(paths: PathLike | Iterable[PathLike], *, shape: str = "auto",
                  fields: Mapping[str, str] | None = None, format: str | None = None,
                  json_columns: Sequence[str] = (), on_error: str = "raise",
                  summary: LoadSummary | None = None, row_format: str = "auto") -> Iterator[dict[str, Any]]:
    """Yields canonical examples from files (paths, globs), file after file, in order.

    ``row_format`` is the rows' layout (prefjax.data.formats; "auto" detects it from the first row
    that fits one and logs what it found). ``shape="auto"`` takes the kind of the first example for
    all files. With ``on_error="skip"`` the skipped rows are counted in ``summary`` (made here if not
    given) and logged at the end, counts and first message per reason.
    """
    check_on_error(on_error)
    if summary is None and on_error == "skip":
        summary = LoadSummary()
    files = expand_paths(paths)

    def rows() -> Iterator[tuple[Location, dict]]:
        for path in files:
            yield from read_rows(path, format=format, json_columns=json_columns, on_error=on_error,
                                 summary=summary)

    yield from iter_parse(rows(), shape=shape, fields=fields, on_error=on_error, summary=summary,
                          row_format=row_format)
    if summary is not None and summary.num_skipped:
        log.warning("%s: %s", ", ".join(files), summary)
