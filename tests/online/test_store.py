"""prefjax.online.store: one atomic file per round, exact round trips, bounded size, resume
trimming, and store files that prefjax.data reads as ranked rows."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from prefjax.data import load_source
from prefjax.online.store import SampleStore, StoreError


def _row(i: int, round: int, k: int = 3) -> dict:
    rng = np.random.default_rng((round, i))
    return {"prompt": f"{i}+{round}=", "responses": [f"answer {i} {j}" for j in range(k)],
            "scores": [float(x) for x in rng.normal(size=k)], "prompt_ids": [5, 6, i],
            "response_ids": [[7, j, 1] for j in range(k)], "logps": [float(x) for x in -rng.random(k) * 10],
            "ref_logps": [1 / 3, 0.1, -1e-300][:k], "sampler_logps": [float(np.float32(-2.7))] * k,
            "origin": [0, 1, 2][:k], "step": 10 * round + i, "round": round, "chosen_index": 0,
            "rejected_index": 2}


def _rows(round: int, n: int = 4) -> list[dict]:
    return [_row(i, round) for i in range(n)]


def _same(a, b) -> bool:
    """Equal with NaN == NaN (repr of floats is exact)."""
    return json.dumps(a) == json.dumps(b)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_rows_round_trip_exactly(tmp_path, fmt):
    store = SampleStore(tmp_path / "samples", fmt=fmt, keep_rounds=0)
    rows = _rows(3)
    rows[1]["scores"][2] = math.nan
    rows[2]["logps"] = np.asarray([-1.25, np.float32(0.1), -np.inf], np.float64)  # numpy -> lists
    rows[3]["step"] = np.int64(2**40)
    path = store.write_round(3, rows)
    assert path == tmp_path / "samples" / f"round_000003.{fmt}"
    got = store.read_round(3)
    want = json.loads(json.dumps(_rows_plain(rows)))
    assert _same(got, want)
    assert got[2]["logps"][1] == float(np.float32(0.1))  # float32 values survive bit for bit
    assert got[0]["ref_logps"][2] == -1e-300 and got[0]["ref_logps"][0] == 1 / 3
    assert isinstance(got[3]["step"], int) and got[3]["step"] == 2**40
    assert store.read_round(4) is None
    assert [p.name for p in (tmp_path / "samples").iterdir()] == [path.name]  # no temporary left behind


def _rows_plain(rows):
    return [{k: (v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v)
             for k, v in row.items()} for row in rows]


def test_rewriting_a_round_replaces_it(tmp_path):
    store = SampleStore(tmp_path, keep_rounds=0)
    store.write_round(1, _rows(1, n=4))
    store.write_round(1, _rows(7, n=2))
    assert _same(store.read_round(1), _rows(7, n=2))


def test_keep_rounds_keeps_the_newest_and_never_the_round_just_written(tmp_path):
    store = SampleStore(tmp_path, keep_rounds=2)
    for r in range(1, 6):
        store.write_round(r, _rows(r, n=1))
    assert store.rounds() == [4, 5]
    # A replay writing an older round keeps it, although it is not among the newest two.
    store.write_round(2, _rows(2, n=1))
    assert store.rounds() == [2, 4, 5]
    assert _same(store.read_round(5), _rows(5, n=1))


def test_max_bytes_deletes_the_oldest_rounds(tmp_path):
    store = SampleStore(tmp_path, keep_rounds=0, max_bytes=1)
    store.write_round(0, _rows(0))
    one_round = store.size_bytes()
    store = SampleStore(tmp_path, keep_rounds=0, max_bytes=int(2.5 * one_round))
    for r in range(1, 6):
        store.write_round(r, _rows(r))
        assert store.size_bytes() <= int(2.5 * one_round) + one_round // 10
    assert store.rounds() == [4, 5]
    tiny = SampleStore(tmp_path, keep_rounds=0, max_bytes=1)
    tiny.write_round(6, _rows(6))
    assert tiny.rounds() == [6]  # over the limit alone, but the round just written stays


def test_drop_after_deletes_later_rounds_for_an_exact_resume(tmp_path):
    store = SampleStore(tmp_path, keep_rounds=0)
    for r in range(5):
        store.write_round(r, _rows(r, n=1))
    (tmp_path / ".round_000005.jsonl.deadbeef.tmp").write_text("{half")  # a write killed midway
    assert store.drop_after(2) == [3, 4]
    assert store.rounds() == [0, 1, 2]
    assert not list(tmp_path.glob(".*tmp"))
    assert store.drop_after(-1) == [0, 1, 2] and store.rounds() == []


def test_only_the_writer_writes_but_every_process_reads(tmp_path):
    writer = SampleStore(tmp_path / "s", keep_rounds=1)
    reader = SampleStore(tmp_path / "s", keep_rounds=1, writer=False)
    assert reader.write_round(0, _rows(0)) == writer.path(0)
    assert reader.rounds() == [] and writer.rounds() == []
    writer.write_round(0, _rows(0))
    writer.write_round(1, _rows(1))
    assert reader.rounds() == [1] and _same(reader.read_round(1), _rows(1))
    assert reader.drop_after(0) == [1] and writer.rounds() == [1]  # a reader deletes nothing
    assert SampleStore(tmp_path / "absent", keep_rounds=1, writer=False).rounds() == []
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_store_files_are_ranked_rows_for_prefjax_data(tmp_path, fmt):
    store = SampleStore(tmp_path / "samples", fmt=fmt, keep_rounds=0)
    store.write_round(0, _rows(0, n=2))
    store.write_round(1, _rows(1, n=3))
    source = load_source(store.glob)  # extra keys (ids, log-probs, step, ...) are ignored
    assert len(source) == 5
    first = source[0]
    assert first["kind"] == "ranked" and first["format"] == "text"
    assert first["prompt"] == [{"role": "user", "content": "0+0="}]
    assert [r[0]["content"] for r in first["responses"]] == _row(0, 0)["responses"]
    assert first["scores"] == _row(0, 0)["scores"]
    assert source[4]["source"].endswith(f"round_000001.{fmt}:3")


def test_rows_prefjax_data_refuses_are_skipped_with_on_error_skip(tmp_path):
    store = SampleStore(tmp_path, keep_rounds=0)
    rows = _rows(0, n=3)
    rows[1]["responses"][2] = rows[1]["responses"][0]  # two samples coincide
    rows[2]["scores"][0] = math.nan  # no reward
    store.write_round(0, rows)
    with pytest.raises(ValueError, match=r"round_000000.jsonl, line 2: field 'responses\[2\]': identical"):
        load_source(store.glob)
    source = load_source(store.glob, on_error="skip")
    assert len(source) == 1 and source.summary.num_skipped == 2


def test_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(StoreError, match=r"format must be one of \('jsonl', 'parquet'\), got 'csv'"):
        SampleStore(tmp_path, fmt="csv", keep_rounds=1)
    with pytest.raises(StoreError,
                       match=r"keep_rounds must be an integer >= 0 \(0 keeps every round\), got -1"):
        SampleStore(tmp_path, keep_rounds=-1)
    with pytest.raises(StoreError, match=r"max_bytes must be a positive integer or None, got 0"):
        SampleStore(tmp_path, keep_rounds=1, max_bytes=0)
    store = SampleStore(tmp_path, keep_rounds=1)
    with pytest.raises(StoreError, match=r"a round must be an integer >= 0, got -2"):
        store.write_round(-2, [])
    with pytest.raises(StoreError, match=r"round 0, row 1: a row must be a dict, got list"):
        store.write_round(0, [{}, []])
    with pytest.raises(StoreError, match=r"round 0, row 0: not JSON-able: .*set"):
        store.write_round(0, [{"x": {1, 2}}])
    assert store.rounds() == [] and not list(tmp_path.iterdir())  # a failed write leaves nothing
    (tmp_path / "round_000004.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(StoreError, match=r"round_000004.jsonl:2: malformed JSON"):
        store.read_round(4)
    parquet = SampleStore(tmp_path / "pq", fmt="parquet", keep_rounds=1)
    with pytest.raises(StoreError, match=r"round 0: the rows do not make one Parquet table"):
        parquet.write_round(0, [{"step": 1}, {"step": "one"}])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    with pytest.raises(StoreError,
                       match=r"fmt='parquet' needs pyarrow \(pip install pyarrow\), or use fmt='jsonl'"):
        SampleStore(tmp_path / "pq2", fmt="parquet", keep_rounds=1)
