"""prefjax.data.readers: every shape in every format, positions in errors, and the skip policy."""

from __future__ import annotations

import gzip
import logging
import math
import pathlib
import shutil

import pytest

from prefjax.data.readers import detect_format, expand_paths, read_examples, read_rows
from prefjax.data.records import DataError, LoadSummary
from tests.data.fixture_helpers import bot, fixture, same, user

SHAPES = ("pairs_text", "pairs_chat", "unpaired", "ranked")
FORMATS = ("jsonl", "json", "parquet", "csv")
# CSV cells are text: list-valued columns are JSON-encoded in the CSV fixtures.
CSV_JSON_COLUMNS = {"pairs_text": (), "pairs_chat": ("prompt", "chosen", "rejected"), "unpaired": (),
                    "ranked": ("responses", "scores", "ranks")}
NAN = math.nan


def without_source(examples):
    return [{k: v for k, v in e.items() if k != "source"} for e in examples]


# The fixtures' content, written out by hand from the .jsonl masters.
EXPECTED = {
    "pairs_text": [
        {"kind": "pair", "format": "text", "prompt": [user("What is the capital of France?")],
         "chosen": [bot("Paris.")], "rejected": [bot("London.")], "score_chosen": 9.0, "score_rejected": 2.5,
         "margin": NAN, "weight": 1.0},
        {"kind": "pair", "format": "text", "prompt": [user("Name a primary color.")], "chosen": [bot("Red.")],
         "rejected": [bot("Purple, maybe.")], "score_chosen": NAN, "score_rejected": NAN, "margin": 1.5,
         "weight": 0.5},
        {"kind": "pair", "format": "text", "prompt": [user("Say hi in Spanish.")],
         "chosen": [bot("Hola, ¿qué tal?")], "rejected": [bot("Bonjour.")], "score_chosen": NAN,
         "score_rejected": NAN, "margin": NAN, "weight": 1.0},
    ],
    "pairs_chat": [
        {"kind": "pair", "format": "chat", "prompt": [user("What is two plus two?")],
         "chosen": [bot("Four.")], "rejected": [bot("Five.")], "score_chosen": NAN, "score_rejected": NAN,
         "margin": NAN, "weight": 1.0},
        {"kind": "pair", "format": "chat",
         "prompt": [{"role": "system", "content": "Be brief."}, user("Hi!"), bot("Hello."),
                    user("Name a fruit.")],
         "chosen": [bot("Apple.")],
         "rejected": [bot("A fruit is the seed-bearing part of a plant, for example an apple.")],
         "score_chosen": NAN, "score_rejected": NAN, "margin": NAN, "weight": 1.0},
        {"kind": "pair", "format": "chat", "prompt": [user("Translate 'cat' to French.")],
         "chosen": [bot("Chat.")], "rejected": [bot("Chien.")], "score_chosen": 4.5, "score_rejected": 1.0,
         "margin": NAN, "weight": 1.0},
    ],
    "unpaired": [
        {"kind": "unpaired", "format": "text", "prompt": [user("Is water wet?")],
         "completion": [bot("Yes, in everyday terms.")], "label": True, "weight": 1.0},
        {"kind": "unpaired", "format": "text", "prompt": [user("What is 2+2?")], "completion": [bot("5")],
         "label": False, "weight": 2.0},
        {"kind": "unpaired", "format": "text", "prompt": [user("Suggest a pet.")],
         "completion": [bot("A cat is a calm companion.")], "label": True, "weight": 1.0},
    ],
    "ranked": [
        {"kind": "ranked", "format": "text", "prompt": [user("Greet me.")],
         "responses": [[bot("Hello there!")], [bot("Hi.")], [bot("Yo")]], "scores": [3.0, 2.0, 1.0],
         "weight": 1.0},
        {"kind": "ranked", "format": "text", "prompt": [user("Pick a fruit.")],
         "responses": [[bot("Apple")], [bot("Banana")], [bot("Cherry")]], "scores": [-2.0, -1.0, -3.0],
         "weight": 0.25},
    ],
}
# How each format numbers rows in "source": JSONL lines and CSV/Parquet rows from 1,
# JSON-array indices from 0.
FIRST_POSITION = {"jsonl": 1, "json": 0, "parquet": 1, "csv": 1}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_in_every_format(shape, fmt):
    path = fixture(f"{shape}.{fmt}")
    json_columns = CSV_JSON_COLUMNS[shape] if fmt == "csv" else ()
    examples = list(read_examples(path, json_columns=json_columns))
    assert same(without_source(examples), EXPECTED[shape])
    first = FIRST_POSITION[fmt]
    assert [e["source"] for e in examples] == [f"{path}:{first + i}" for i in range(len(examples))]


def test_read_rows_yields_raw_dicts_with_locations():
    rows = list(read_rows(fixture("pairs_text.csv")))
    assert [str(loc) for loc, _ in rows] == [fixture("pairs_text.csv") + f":{i}" for i in (1, 2, 3)]
    assert rows[1][1] == {"prompt": "Name a primary color.", "chosen": "Red.", "rejected": "Purple, maybe.",
                          "score_chosen": "", "score_rejected": "", "margin": "1.5", "weight": "0.5"}
    assert rows[1][0].line == 3


def test_field_mapping_through_the_reader():
    fields = {"prompt": "question", "chosen": "response_a", "rejected": "response_b",
              "score_chosen": "quality"}
    examples = list(read_examples(fixture("mapped.jsonl"), fields=fields))
    assert [e["prompt"] for e in examples] == [[user("Capital of Italy?")], [user("Largest ocean?")]]
    assert examples[0]["score_chosen"] == 0.7 and math.isnan(examples[1]["score_chosen"])


def test_label_words_in_csv():
    examples = list(read_examples(fixture("unpaired_words.csv")))
    assert [e["label"] for e in examples] == [True, False, True, False]


def test_detect_format(tmp_path):
    assert detect_format(fixture("pairs_text.json")) == "json"
    jsonl_named_json = tmp_path / "export.json"  # Hugging Face's to_json writes JSON Lines
    shutil.copy(fixture("pairs_text.jsonl"), jsonl_named_json)
    assert detect_format(jsonl_named_json) == "jsonl"
    assert len(list(read_examples(jsonl_named_json))) == 3
    assert detect_format("a/b.PARQUET") == "parquet" and detect_format("x.tsv") == "tsv"
    with pytest.raises(ValueError, match=r"x\.txt: unknown data file type"):
        detect_format("x.txt")


def test_gzip_is_detected_from_content(tmp_path):
    data = pathlib.Path(fixture("pairs_chat.jsonl")).read_bytes()
    for name in ("prefs.jsonl.gz", "downloaded_blob.jsonl"):  # with and without the suffix
        (tmp_path / name).write_bytes(gzip.compress(data))
        examples = list(read_examples(tmp_path / name))
        assert same(without_source(examples), EXPECTED["pairs_chat"])


def test_tsv(tmp_path):
    (tmp_path / "p.tsv").write_text("prompt\tchosen\trejected\nq, with comma\ta\tb\n")
    (example,) = read_examples(tmp_path / "p.tsv")
    assert example["prompt"] == [user("q, with comma")]


# -- errors: file, line and field --------------------------------------------------------------

def test_invalid_utf8_line():
    path = fixture("bad_utf8.jsonl")
    with pytest.raises(DataError, match=r"bad_utf8\.jsonl, line 2: invalid UTF-8 at byte 16") as info:
        list(read_rows(path))
    assert info.value.reason == "bad_utf8"
    summary = LoadSummary()
    kept = [str(loc) for loc, _ in read_rows(path, on_error="skip", summary=summary)]
    assert kept == [f"{path}:1", f"{path}:3"]
    assert dict(summary.skipped) == {"bad_utf8": 1} and summary.rows == 3


def test_malformed_json_line():
    # read_rows only parses JSON, so the first error is the malformed line 8, not a record problem.
    with pytest.raises(DataError, match=r"bad_pairs\.jsonl, line 8: malformed JSON: Expecting value"):
        list(read_rows(fixture("bad_pairs.jsonl")))


def test_first_bad_record_raises_by_default():
    with pytest.raises(DataError, match=r"bad_pairs\.jsonl, line 2: field 'rejected': missing"):
        list(read_examples(fixture("bad_pairs.jsonl")))


def test_skip_counts_every_reason(caplog):
    summary = LoadSummary()
    with caplog.at_level(logging.WARNING, logger="prefjax.data.readers"):
        examples = list(read_examples(fixture("bad_pairs.jsonl"), on_error="skip", summary=summary))
    path = fixture("bad_pairs.jsonl")
    assert [e["source"] for e in examples] == [f"{path}:1", f"{path}:9"]
    # One line per kind of problem, see the fixture: 2 missing, 3 blank, 4 identical, 5 content 42,
    # 6 role "bot", 7 score "high", 8 malformed JSON, 10 a JSON array, 11 weight -1.
    assert dict(summary.skipped) == {"missing_field": 1, "empty_response": 1, "identical_responses": 1,
                                     "wrong_type": 1, "bad_role": 1, "bad_score": 2, "bad_json": 1,
                                     "bad_row": 1}
    assert (summary.rows, summary.examples) == (11, 2)
    assert summary.first_errors["bad_role"] == (f"{path}, line 6: field 'rejected[1].role': role must be "
                                                "one of ('system', 'user', 'assistant', 'tool'), got 'bot'")
    assert "skipped 9 bad rows" in caplog.text  # not silent


def test_skip_needs_somewhere_to_count():
    with pytest.raises(ValueError, match="needs a LoadSummary"):
        list(read_rows(fixture("bad_pairs.jsonl"), on_error="skip"))


def test_json_array_errors_use_the_element_index():
    path = fixture("bad_array.json")
    summary = LoadSummary()
    examples = list(read_examples(path, on_error="skip", summary=summary))
    assert [e["source"] for e in examples] == [f"{path}:0"]
    assert summary.first_errors["bad_row"].startswith(f"{path}, index 1: an array element must be a JSON "
                                                      "object")
    assert summary.first_errors["empty_response"] == f"{path}, index 2: field 'rejected': empty"


def test_malformed_json_array_is_a_file_error_even_when_skipping():
    with pytest.raises(DataError, match=r"malformed_array\.json, line 3: malformed JSON: Expecting ','"):
        list(read_examples(fixture("malformed_array.json"), on_error="skip", summary=LoadSummary()))


def test_json_array_must_be_an_array(tmp_path):
    (tmp_path / "obj.json").write_text('[{"a": 1}')  # starts like an array, is not one
    with pytest.raises(DataError, match=r"obj\.json, line 1: malformed JSON"):
        list(read_rows(tmp_path / "obj.json", format="json"))
    (tmp_path / "obj2.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match="must hold an array of objects"):
        list(read_rows(tmp_path / "obj2.json", format="json"))


def test_invalid_utf8_in_a_json_array_names_the_line(tmp_path):
    (tmp_path / "a.json").write_bytes(b'[\n{"prompt": "ok"},\n{"prompt": "caf\xe9"}\n]\n')
    with pytest.raises(DataError, match=r"a\.json, line 3: invalid UTF-8"):
        list(read_rows(tmp_path / "a.json"))


def test_csv_errors_use_row_and_line():
    path = fixture("bad_rows.csv")
    summary = LoadSummary()
    examples = list(read_examples(path, on_error="skip", summary=summary))
    assert [e["source"] for e in examples] == [f"{path}:1"]
    assert dict(summary.skipped) == {"bad_row": 1, "empty_response": 1, "bad_utf8": 1}
    assert summary.first_errors["bad_row"] == f"{path}, row 2 (line 3): has 4 cells, the header has 3"
    # row 3 spans lines 4-5 (a quoted newline in its prompt); its chosen cell is empty
    assert summary.first_errors["empty_response"] == f"{path}, row 3 (line 4): field 'chosen': empty"
    assert summary.first_errors["bad_utf8"] == f"{path}, row 4 (line 6): field 'prompt': invalid UTF-8"


def test_bad_json_cell_names_the_column():
    with pytest.raises(DataError, match=r"pairs_text\.csv, row 1 \(line 2\): field 'chosen': malformed JSON"):
        list(read_rows(fixture("pairs_text.csv"), json_columns=("chosen",)))


def test_csv_file_errors(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty file: a CSV needs a header row"):
        list(read_rows(tmp_path / "empty.csv"))
    (tmp_path / "dup.csv").write_text("prompt,chosen,chosen\na,b,c\n")
    with pytest.raises(DataError, match=r"dup\.csv, line 1: duplicate header columns \['chosen'\]"):
        list(read_rows(tmp_path / "dup.csv"))


def test_unreadable_parquet(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        list(read_rows(tmp_path / "bad.parquet"))


def test_bad_unpaired_and_ranked_fixtures():
    summary = LoadSummary()
    assert len(list(read_examples(fixture("bad_unpaired.jsonl"), on_error="skip", summary=summary))) == 1
    assert dict(summary.skipped) == {"bad_label": 2, "missing_field": 1}
    summary = LoadSummary()
    assert len(list(read_examples(fixture("bad_ranked.jsonl"), on_error="skip", summary=summary))) == 1
    assert dict(summary.skipped) == {"bad_score": 3, "empty_response": 1, "identical_responses": 1}


# -- paths -------------------------------------------------------------------------------------

def test_expand_paths(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.csv"):
        shutil.copy(fixture("pairs_text.jsonl"), tmp_path / name)
    assert expand_paths(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert expand_paths([tmp_path / "c.csv"]) == [str(tmp_path / "c.csv")]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_paths(str(tmp_path / "*.parquet"))
    with pytest.raises(FileNotFoundError, match="it is a directory"):
        expand_paths(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        expand_paths(tmp_path / "missing.jsonl")


def test_several_files_in_order():
    examples = list(read_examples([fixture("pairs_text.jsonl"), fixture("pairs_chat.parquet")]))
    assert same(without_source(examples), EXPECTED["pairs_text"] + EXPECTED["pairs_chat"])
