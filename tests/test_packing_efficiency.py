"""benchmarks/packing_efficiency.py: its token counts agree with the input lengths, and packing pays off."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import packing_efficiency as pe

from prefjax.data.batching import build_batch
from prefjax.data.packing import LayoutConfig, PackingOverflow

SMALL = pe.DatasetConfig(num_pairs=150, max_len=128, prompt_median=12, response_median=24, seed=3)
SMALL_BATCH = 32  # 150 is not a multiple: the last batch carries filler examples


def _input_tokens(examples) -> int:
    # Straight from the arrays of each example, not from the script's length bookkeeping.
    return sum(len(ex.prompt_ids) * 2 + len(ex.response_ids[0]) + len(ex.response_ids[1]) for ex in examples)


@pytest.fixture(scope="module")
def small_rows():
    return pe.run(SMALL, batch_sizes=(SMALL_BATCH,), row_lengths=(128, 256), bucket_multiple=16)


def test_every_real_token_is_counted_once(small_rows):
    expected = _input_tokens(pe.make_dataset(SMALL))
    assert len(small_rows) == 7  # 3 unpacked, packed and packed fill for 2 row lengths
    for row in small_rows:
        assert row["real_tokens"] == expected, row["layout"]
        assert row["real_pairs"] == SMALL.num_pairs and row["pack_dropped"] == 0
        assert row["filler_tokens"] > 0  # the partial final batch was completed with fillers
        assert row["real_tokens"] + row["filler_tokens"] + row["pad_tokens"] == row["slots"]
        assert 0 < row["real_fraction"] <= 1


def test_unpacked_to_max_len_fraction_matches_the_lengths(small_rows):
    expected = _input_tokens(pe.make_dataset(SMALL))
    num_batches = math.ceil(SMALL.num_pairs / SMALL_BATCH)
    rows = 2 * SMALL_BATCH * num_batches
    by_name = {r["layout"]: r for r in small_rows}
    assert by_name["unpacked max"]["real_fraction"] == pytest.approx(expected / (rows * SMALL.max_len))
    assert by_name["unpacked max"]["batches"] == num_batches


def test_packing_beats_padding(small_rows):
    unpacked = max(r["real_fraction"] for r in small_rows if not r["packed"])
    for row in small_rows:
        if row["packed"]:
            assert row["real_fraction"] >= unpacked
            assert row["pairs_per_row"] > 0.5  # an unpacked row holds half a pair


def test_fitted_pack_rows_is_the_smallest_that_fits():
    examples = pe.make_dataset(SMALL)
    rows = pe.fit_pack_rows(examples, SMALL_BATCH, 128)

    def packs_all(pack_rows: int) -> bool:
        layout = LayoutConfig(max_len=128, pack=True, row_length=128, pack_rows=pack_rows)
        try:
            for start in range(0, len(examples), SMALL_BATCH):
                build_batch(examples[start : start + SMALL_BATCH], SMALL_BATCH, 2, layout, pe.PAD_ID)
        except PackingOverflow:
            return False
        return True

    assert packs_all(rows) and not packs_all(rows - 1)


def test_default_skewed_lengths_reach_the_target_when_packed():
    # The default distribution, fewer pairs (two batches of 512) to stay fast.
    config = pe.DatasetConfig(num_pairs=1024)
    prompt, response = pe.sample_lengths(config)
    lengths = (prompt[:, None] + response).ravel()
    assert lengths.max() <= config.max_len and (lengths == config.max_len).any()
    assert (lengths < config.max_len / 4).mean() > 0.5  # skewed: most sequences are short
    rows = pe.run(config, batch_sizes=(512,), row_lengths=(1024,))
    packed = [r for r in rows if r["packed"]]
    assert packed and all(r["real_fraction"] >= 0.9 for r in packed), rows


def test_filling_the_rows_reaches_the_target_at_64_pairs_per_batch():
    # Counted batches of 64 need rows for their heaviest batch (under 0.9 real); forming the
    # batches by what fits the same rows (fill_packed_rows) does not.
    config = pe.DatasetConfig(num_pairs=1024)
    rows = {r["layout"]: r for r in pe.run(config, batch_sizes=(64,), row_lengths=(1024,))}
    counted, filled = rows["packed 1024"], rows["packed fill 1024"]
    assert counted["rows_per_batch"] == filled["rows_per_batch"]  # the same compiled shape per step
    assert counted["real_fraction"] < 0.9 <= filled["real_fraction"], (counted, filled)
    assert filled["batches"] < counted["batches"] and filled["real_pairs"] == 1024


def test_main_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = pe.main(["--pairs", "40", "--max-len", "64", "--prompt-median", "8", "--response-median", "12",
                    "--batch-sizes", "16", "--row-lengths", "64", "--json", str(out)])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 16 |")]
    assert [line.split(" | ")[1] for line in table] == ["unpacked max", "unpacked x64", "unpacked pow2", "packed 64",
                                                        "packed fill 64"]
    assert json.loads(out.read_text()) == rows
