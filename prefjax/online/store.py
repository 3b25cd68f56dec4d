"""The sample store: every online round's samples, one file per round in the workdir.

    store = SampleStore(workdir / "samples", fmt="jsonl", keep_rounds=3, writer=jax.process_index() == 0)
    store.write_round(3, rows)       # -> .../samples/round_000003.jsonl, written atomically
    store.read_round(3)              # the rows exactly as written (None if that round has no file)
    store.rounds()                   # [1, 2, 3]: the rounds on disk, oldest first
    store.drop_after(2)              # resuming at round 2: later rounds are replayed, so deleted

A row is one prompt with its K samples, as prefjax.online.source writes it: ``prompt`` (str),
``responses`` ([str] * K), ``scores`` ([float] * K, the rewards), ``prompt_ids`` ([int]),
``response_ids`` ([[int]] * K), ``logps`` (the sampling policy's own, untempered) / ``ref_logps`` /
``sampling_logps`` (under the tempered, filtered distribution sampled from) ([float] * K),
``complete`` and ``origin`` ([bool] / [int] * K), ``step``, ``round``, and what the step trains
on: ``train_indices``, ``train_scores``, ``weight``. The store does not check the schema: it
keeps whatever JSON-able dicts it is given (numpy scalars and arrays become Python numbers and
lists).

Files. ``round_000003.jsonl`` (one JSON object per line; floats are written with ``repr``, so
they read back bit for bit, NaN and infinities included as JSON's ``NaN`` / ``Infinity``) or
``round_000003.parquet`` (``fmt="parquet"``, through pyarrow, a dependency of prefjax.data).
Parquet stores one schema per file: a key that some rows of a round lack reads back as
``None`` in those rows, and the values of one key must have one type in every row. A file
is written to a hidden temporary name in the same directory and renamed over the final name
(``os.replace``), so a reader, or a run killed mid-write, never sees half a round.

Size. ``keep_rounds`` (0 = keep all) keeps the newest rounds; ``max_bytes`` (None = no limit)
also deletes the oldest rounds while the store is bigger. The round just written is never
deleted. Only the process built with ``writer=True`` (process 0) writes or deletes; every
process can read.

Reading a store with prefjax.data. Its files are ranked rows (prompt + responses + scores;
the other keys are ignored by the reader), so a glob of them is a data source::

    load_source(store.glob)                  # "…/samples/round_*.jsonl"; data.source=<that glob>

(``load_source`` takes files and globs, not the bare directory: a directory must be a prepared
TFDS dataset.) Ranked rows must have K >= 2 distinct, non-empty responses and finite scores:
a round where some prompt's samples coincide (common with a sharp policy) or a reward is NaN
holds rows that prefjax.data refuses, so read a store with ``on_error="skip"``
(``data.on_error="skip"``), which counts and skips those rows.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("jsonl", "parquet")
_PREFIX = "round_"
_TMP_PREFIX = ".round_"  # hidden: the store's globs and prefjax.data never read a half-written file


class StoreError(ValueError):
    """A bad store argument, or a store file that cannot be read; the message names it."""


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python numbers and lists (JSON-able)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()  # float32 -> the same value as a Python float (exact)
    return value


class SampleStore:
    """Rounds of samples in ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, *, fmt: str = "jsonl", keep_rounds: int,
                 max_bytes: int | None = None, writer: bool = True):
        if fmt not in FORMATS:
            raise StoreError(f"sample store: format must be one of {FORMATS}, got {fmt!r}")
        if isinstance(keep_rounds, bool) or not isinstance(keep_rounds, int) or keep_rounds < 0:
            raise StoreError(f"sample store: keep_rounds must be an integer >= 0 (0 keeps every round), "
                             f"got {keep_rounds!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes < 1):
            raise StoreError(f"sample store: max_bytes must be a positive integer or None, got {max_bytes!r}")
        if fmt == "parquet":
            _pyarrow()  # fail now, not after a round of sampling
        self.directory = Path(directory)
        self.fmt, self.keep_rounds, self.max_bytes, self.writer = fmt, keep_rounds, max_bytes, writer
        self._name = re.compile(rf"^{_PREFIX}(\d+)\.{fmt}$")
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_temporaries()

    # -------------------------------------------------------------------------------- names

    def path(self, round: int) -> Path:  # pylint: disable=redefined-builtin
        """The file of ``round`` (whether or not it exists)."""
        return self.directory / f"{_PREFIX}{_check_round(round):06d}.{self.fmt}"

    @property
    def glob(self) -> str:
        """A glob of every round file: a data source for prefjax.data.load_source."""
        return str(self.directory / f"{_PREFIX}*.{self.fmt}")

    def rounds(self) -> list[int]:
        """The rounds that have a file, oldest first."""
        if not self.directory.is_dir():
            return []
        found = (self._name.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def size_bytes(self) -> int:
        """Bytes of every round file together."""
        return sum(self._size(r) for r in self.rounds())

    # ------------------------------------------------------------------------------ writing

    def write_round(self, round: int, rows: Sequence[Mapping[str, Any]]) -> Path:  # pylint: disable=redefined-builtin
        """Writes ``rows`` as ``round``'s file (replacing it), then trims the store; returns the path.

        A process built with ``writer=False`` writes nothing and returns the path process 0 writes.
        """
        path = self.path(round)
        if not self.writer:
            return path
        rows = [_plain(_check_row(row, i, round)) for i, row in enumerate(rows)]
        tmp = self.directory / f"{_TMP_PREFIX}{round:06d}.{self.fmt}.{uuid.uuid4().hex}.tmp"
        try:
            if self.fmt == "jsonl":
                self._write_jsonl(tmp, rows, round)
            else:
                self._write_parquet(tmp, rows, round)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._trim(keep=round)
        return path

    def drop_after(self, round: int) -> list[int]:  # pylint: disable=redefined-builtin
        """Deletes the files of rounds after ``round`` (a resumed run replays and rewrites them);
        returns the rounds deleted. Does nothing on a reader (``writer=False``)."""
        _check_round(round, allow_negative=True)
        later = [r for r in self.rounds() if r > round]
        if self.writer:
            for r in later:
                self.path(r).unlink(missing_ok=True)
            self._remove_temporaries()
        return later

    def _write_jsonl(self, tmp: Path, rows: list[dict[str, Any]], round: int) -> None:  # pylint: disable=redefined-builtin
        with open(tmp, "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                try:
                    # json writes floats with repr (shortest round-trip form): they read back exactly.
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                except (TypeError, ValueError) as err:
                    raise StoreError(f"sample store: round {round}, row {i}: not JSON-able: {err}") from None
            f.flush()
            os.fsync(f.fileno())  # the rename must not overtake the data on a crash

    def _write_parquet(self, tmp: Path, rows: list[dict[str, Any]], round: int) -> None:  # pylint: disable=redefined-builtin
        pa, pq = _pyarrow()
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowException, TypeError, ValueError) as err:
            raise StoreError(f"sample store: round {round}: the rows do not make one Parquet table (every "
                             f"key needs one type in all rows): {err}") from None
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())

    def _size(self, round: int) -> int:  # pylint: disable=redefined-builtin
        try:
            return self.path(round).stat().st_size
        except FileNotFoundError:
            return 0

    def _trim(self, keep: int) -> None:
        """Deletes the oldest rounds beyond keep_rounds and max_bytes, never round ``keep``."""
        rounds = self.rounds()
        doomed = set()
        if self.keep_rounds:
            doomed.update(rounds[:-self.keep_rounds])
        if self.max_bytes is not None:
            total = sum(self._size(r) for r in rounds if r not in doomed)
            for r in rounds:  # oldest first
                if total <= self.max_bytes:
                    break
                if r not in doomed and r != keep:
                    doomed.add(r)
                    total -= self._size(r)
        doomed.discard(keep)
        for r in doomed:
            self.path(r).unlink(missing_ok=True)

    def _remove_temporaries(self) -> None:
        """Half-written files of a run killed while writing (they were never renamed into place)."""
        for p in self.directory.glob(f"{_TMP_PREFIX}*.tmp"):
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------ reading

    def read_round(self, round: int) -> list[dict[str, Any]] | None:  # pylint: disable=redefined-builtin
        """The rows of ``round`` as written, or None when the round has no file."""
        path = self.path(round)
        if not path.is_file():
            return None
        if self.fmt == "jsonl":
            return _read_jsonl(path)
        pa, pq = _pyarrow()
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise StoreError(f"{path}: not a readable Parquet file: {err}") from None

    def __repr__(self) -> str:
        return f"SampleStore({str(self.directory)!r}, fmt={self.fmt!r}, rounds={self.rounds()})"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise StoreError(f"{path}:{number}: malformed JSON ({err.msg}, column {err.colno}); the "
                                 "store writes whole files, so this one was edited or damaged") from None
    return rows


def _check_round(round: Any, allow_negative: bool = False) -> int:  # pylint: disable=redefined-builtin
    integer = isinstance(round, (int, np.integer)) and not isinstance(round, bool)
    if not integer or (round < 0 and not allow_negative):
        raise StoreError(f"sample store: a round must be an integer >= 0, got {round!r}")
    return int(round)


def _check_row(row: Any, index: int, round: int) -> Mapping[str, Any]:  # pylint: disable=redefined-builtin
    if not isinstance(row, Mapping):
        raise StoreError(f"sample store: round {round}, row {index}: a row must be a dict, "
                         f"got {type(row).__name__}")
    return row


def _pyarrow() -> Any:
    try:
        import pyarrow as pa  # pylint: disable=import-outside-toplevel
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise StoreError("sample store: fmt='parquet' needs pyarrow (pip install pyarrow), "
                         "or use fmt='jsonl'") from None
    return pa, pq
