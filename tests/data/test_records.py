"""prefjax.data.records: one raw row -> one canonical example, and every kind of bad row."""

from __future__ import annotations

import json
import math
import pickle

import pytest

from prefjax.data.formats import detect_row_format, iter_parse
from prefjax.data.records import DataError, LoadSummary, Location, parse_label, parse_row
from tests.data.fixture_helpers import bot, system, user

LOC = Location("prefs.jsonl", 7)


def same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN (json writes both as NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# -- pairs -------------------------------------------------------------------------------------

def test_text_pair_becomes_one_message_conversations():
    example = parse_row({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "extra": 1}, "pair", LOC)
    expected = {"kind": "pair", "format": "text", "prompt": [user("Hi")], "chosen": [bot("Hello!")],
                "rejected": [bot("Go away.")], "score_chosen": math.nan, "score_rejected": math.nan,
                "margin": math.nan, "weight": 1.0, "source": "prefs.jsonl:7"}
    assert same(example, expected)
    assert list(example) == list(expected)  # key order is part of the contract's look


def test_optional_numbers_parse_from_numbers_and_text():
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": "2.5", "score_rejected": 1,
           "margin": "", "weight": "0.5"}
    example = parse_row(row, "pair", LOC)
    assert (example["score_chosen"], example["score_rejected"], example["weight"]) == (2.5, 1.0, 0.5)
    assert math.isnan(example["margin"])  # an empty cell is absent


def test_implicit_prompt_is_the_shared_message_prefix():
    shared = [system("Be brief."), user("Hi"), bot("Hello."), user("A fruit?")]
    row = {"chosen": shared + [bot("Apple.")], "rejected": shared + [bot("A tomato, botanically.")]}
    example = parse_row(row, "pair", LOC)
    assert example["format"] == "chat"
    assert example["prompt"] == shared
    assert example["chosen"] == [bot("Apple.")] and example["rejected"] == [bot("A tomato, botanically.")]


def test_multi_message_tails_stay_whole():
    row = {"chosen": [user("q"), bot("a1"), user("more?"), bot("a2")], "rejected": [user("q"), bot("b1")]}
    example = parse_row(row, "pair", LOC)
    assert example["prompt"] == [user("q")]
    assert example["chosen"] == [bot("a1"), user("more?"), bot("a2")]


def test_explicit_prompt_repeated_in_the_responses_is_counted_once():
    # UltraFeedback-binarized style: a prompt column and message lists that start with it.
    row = {"prompt": "Name a prime.", "chosen": [user("Name a prime."), bot("7")],
           "rejected": [user("Name a prime."), bot("9")]}
    example = parse_row(row, "pair", LOC)
    assert example["prompt"] == [user("Name a prime.")]
    assert example["chosen"] == [bot("7")] and example["rejected"] == [bot("9")]


def test_explicit_prompt_then_shared_prefix():
    row = {"prompt": [system("You are terse.")], "chosen": [user("2+2?"), bot("4")],
           "rejected": [user("2+2?"), bot("5")]}
    example = parse_row(row, "pair", LOC)
    assert example["prompt"] == [system("You are terse."), user("2+2?")]


def test_text_prompt_with_message_responses_is_chat():
    example = parse_row({"prompt": "q", "chosen": [bot("a")], "rejected": [bot("b")]}, "pair", LOC)
    assert example["format"] == "chat" and example["prompt"] == [user("q")]


def test_messages_keep_only_role_and_content_and_input_is_untouched():
    chosen = [user("q"), {"role": "assistant", "content": "a", "name": "x"}]
    row = {"chosen": chosen, "rejected": [user("q"), bot("b")]}
    before = json.dumps(row)
    example = parse_row(row, "pair", LOC)
    assert example["chosen"] == [bot("a")]
    assert json.dumps(row) == before
    example["prompt"][0]["content"] = "changed"
    assert row["chosen"][0]["content"] == "q"  # the example does not alias the row


def test_field_mapping_renames_columns_and_errors_name_the_file_column():
    row = {"question": "Capital of Italy?", "response_a": "Rome.", "response_b": "Milan.", "quality": "0.7"}
    fields = {"prompt": "question", "chosen": "response_a", "rejected": "response_b",
              "score_chosen": "quality"}
    example = parse_row(row, "pair", LOC, fields)
    assert example["prompt"] == [user("Capital of Italy?")] and example["score_chosen"] == 0.7
    del row["response_b"]
    with pytest.raises(DataError, match=r"field 'response_b \(rejected\)': missing"):
        parse_row(row, "pair", LOC, fields)


def test_unknown_canonical_name_in_mapping_is_rejected():
    with pytest.raises(ValueError, match="unknown canonical names.*'promt'"):
        parse_row({"prompt": "p", "chosen": "a", "rejected": "b"}, "pair", LOC, {"promt": "question"})


# -- unpaired ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), (1, True), (0, False), (1.0, True), ("up", True), ("Down", False),
    (" thumbs_up ", True), ("thumbs-down", False), ("true", True), ("FALSE", False), ("good", True),
    ("bad", False), ("1", True), ("0", False), ("desirable", True), ("undesirable", False)])
def test_unambiguous_labels(value, expected):
    example = parse_row({"prompt": "p", "completion": "c", "label": value}, "unpaired", LOC)
    assert example["label"] is expected
    assert parse_label(value) is expected


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, -1, "neutral", "2", [1]])
def test_ambiguous_labels_are_errors(value):
    with pytest.raises(DataError, match=r"prefs.jsonl, line 7: field 'label': ambiguous label") as info:
        parse_row({"prompt": "p", "completion": "c", "label": value}, "unpaired", LOC)
    assert info.value.reason == "bad_label"


def test_unpaired_text_and_weight():
    example = parse_row({"prompt": "2+2?", "completion": "5", "label": "down", "weight": 2}, "unpaired", LOC)
    expected = {"kind": "unpaired", "format": "text", "prompt": [user("2+2?")], "completion": [bot("5")],
                "label": False, "weight": 2.0, "source": "prefs.jsonl:7"}
    assert example == expected and list(example) == list(expected)


def test_unpaired_conversation_without_prompt_splits_before_the_trailing_assistant_turns():
    completion = [user("Hi"), bot("Hello"), user("Joke?"), bot("Knock knock."), bot("Who's there?")]
    example = parse_row({"completion": completion, "label": True}, "unpaired", LOC)
    assert example["prompt"] == completion[:3]
    assert example["completion"] == completion[3:]
    assert example["format"] == "chat"


def test_unpaired_conversation_repeating_its_prompt():
    row = {"prompt": [user("q")], "completion": [user("q"), bot("a")], "label": 0}
    example = parse_row(row, "unpaired", LOC)
    assert example["prompt"] == [user("q")] and example["completion"] == [bot("a")]


# -- ranked ------------------------------------------------------------------------------------

def test_ranked_scores_and_ranks():
    example = parse_row({"prompt": "Greet", "responses": ["Hi", "Hello", "Yo"], "scores": [1, 3, "2"]},
                        "ranked", LOC)
    assert example["responses"] == [[bot("Hi")], [bot("Hello")], [bot("Yo")]]
    assert example["scores"] == [1.0, 3.0, 2.0]
    row = {"prompt": "Greet", "responses": ["Hi", "Hello", "Yo"], "ranks": [2, 1, 3]}
    example = parse_row(row, "ranked", LOC)
    assert example["scores"] == [-2.0, -1.0, -3.0]  # rank 1 (best) gets the highest score
    assert list(example) == ["kind", "format", "prompt", "responses", "scores", "weight", "source"]


def test_ranked_conversations_share_an_implicit_prompt():
    q = user("Name a planet.")
    row = {"responses": [[q, bot("Mars.")], [q, bot("The Sun.")], [q, bot("Earth.")]], "scores": [1, -1, 0.5]}
    example = parse_row(row, "ranked", LOC)
    assert example["prompt"] == [q]
    assert example["responses"] == [[bot("Mars.")], [bot("The Sun.")], [bot("Earth.")]]


# -- bad rows: each names file, line and field -------------------------------------------------

TWO = [user("q"), bot("a")]
BAD_ROWS = [
    # (shape, row, field, reason)
    ("pair", {"prompt": "p", "chosen": "a"}, "rejected", "missing_field"),
    ("pair", {"prompt": "p", "chosen": " \n", "rejected": "b"}, "chosen", "empty_response"),
    ("pair", {"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "empty_response"),
    ("pair", {"prompt": "p", "chosen": "same", "rejected": "same "}, "rejected", "identical_responses"),
    ("pair", {"chosen": TWO, "rejected": TWO}, "rejected", "identical_responses"),
    ("pair", {"chosen": [user("q"), bot(3)], "rejected": TWO}, "chosen[1].content", "wrong_type"),
    ("pair", {"chosen": [user("q"), {"role": "assistant"}], "rejected": TWO}, "chosen[1].content",
     "missing_field"),
    ("pair", {"chosen": TWO, "rejected": [user("q"), {"role": "bot", "content": "b"}]}, "rejected[1].role",
     "bad_role"),
    ("pair", {"chosen": TWO, "rejected": [user("q"), user("b")]}, "rejected[1].role", "bad_role"),
    ("pair", {"chosen": TWO, "rejected": [user("q"), bot("  ")]}, "rejected[1].content", "empty_response"),
    ("pair", {"chosen": TWO, "rejected": [user("q")]}, "rejected", "empty_response"),
    ("pair", {"chosen": [bot("a")], "rejected": [bot("b")]}, "prompt", "missing_field"),
    ("pair", {"chosen": "a", "rejected": "b"}, "prompt", "missing_field"),
    ("pair", {"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt", "empty_response"),
    ("pair", {"prompt": "p", "chosen": 42, "rejected": "b"}, "chosen", "wrong_type"),
    ("pair", {"prompt": "p", "chosen": ["a"], "rejected": TWO}, "chosen[0]", "wrong_type"),
    ("pair", {"prompt": "p", "chosen": TWO, "rejected": "b"}, "rejected", "wrong_type"),
    ("pair", {"prompt": "p", "chosen": [], "rejected": TWO}, "chosen", "empty_response"),
    ("pair", {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": "high"}, "score_chosen",
     "bad_score"),
    ("pair", {"prompt": "p", "chosen": "a", "rejected": "b", "score_rejected": True}, "score_rejected",
     "bad_score"),
    ("pair", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("inf")}, "margin", "bad_score"),
    ("pair", {"prompt": "p", "chosen": "a", "rejected": "b", "weight": -1}, "weight", "bad_score"),
    ("pair", {"prompt": "p", "chosen": "a", "rejected": "b", "weight": "nan"}, "weight", "bad_score"),
    ("unpaired", {"prompt": "p", "label": True}, "completion", "missing_field"),
    ("unpaired", {"prompt": "p", "completion": "c"}, "label", "missing_field"),
    ("unpaired", {"completion": [bot("a")], "label": True}, "prompt", "missing_field"),
    ("unpaired", {"completion": [user("q")], "label": True}, "completion", "empty_response"),
    ("ranked", {"prompt": "p", "responses": ["a"], "scores": [1]}, "responses", "empty_response"),
    ("ranked", {"prompt": "p", "responses": "a", "scores": [1]}, "responses", "wrong_type"),
    ("ranked", {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2]}, "scores", "bad_score"),
    ("ranked", {"prompt": "p", "responses": ["a", "b"], "scores": [1, "x"]}, "scores[1]", "bad_score"),
    ("ranked", {"prompt": "p", "responses": ["a", "b"], "scores": [1, float("nan")]}, "scores[1]",
     "bad_score"),
    ("ranked", {"prompt": "p", "responses": ["a", "b"]}, "scores", "missing_field"),
    ("ranked", {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2], "ranks": [1, 2]}, "scores",
     "bad_score"),
    ("ranked", {"prompt": "p", "responses": ["a", "b", "a"], "scores": [1, 2, 3]}, "responses[2]",
     "identical_responses"),
    ("ranked", {"prompt": "p", "responses": ["a", TWO], "scores": [1, 2]}, "responses", "wrong_type"),
    ("ranked", {"prompt": "p", "responses": ["a", ""], "scores": [1, 2]}, "responses[1]", "empty_response"),
]


@pytest.mark.parametrize("shape,row,field,reason", BAD_ROWS)
def test_bad_row_error_names_file_line_and_field(shape, row, field, reason):
    with pytest.raises(DataError) as info:
        parse_row(row, shape, LOC)
    error = info.value
    assert isinstance(error, ValueError)
    assert (error.field, error.reason, error.location) == (field, reason, LOC)
    assert str(error).startswith(f"prefs.jsonl, line 7: field '{field}': ")


def test_non_dict_row():
    with pytest.raises(DataError, match="a row must be an object") as info:
        parse_row(["a", "b"], "pair", Location("x.json", 3, "index"))
    assert str(info.value).startswith("x.json, index 3:")


def test_unknown_shape():
    with pytest.raises(ValueError, match="shape must be one of"):
        parse_row({}, "triple", LOC)


def test_location_descriptions():
    assert Location("a.csv", 3, "row", line=5).describe() == "a.csv, row 3 (line 5)"
    assert str(Location("a.csv", 3, "row", line=5)) == "a.csv:3"
    assert Location("a.parquet").describe() == "a.parquet"


def test_data_error_pickles_with_its_parts():
    error = DataError(LOC, "chosen", "empty response", "empty_response")
    copy = pickle.loads(pickle.dumps(error))
    parts = (str(copy), copy.field, copy.reason, copy.location)
    assert parts == (str(error), "chosen", "empty_response", LOC)


# -- shape detection and the error policy ------------------------------------------------------

def test_detect_shape():
    def shape(row, fields=None):
        return detect_row_format(row, LOC, fields).shapes
    assert shape({"prompt": "p", "chosen": "a", "rejected": "b"}) == ("pair",)
    assert shape({"prompt": "p", "completion": "a", "label": 1}) == ("unpaired",)
    assert shape({"prompt": "p", "responses": ["a", "b"]}) == ("ranked",)
    assert shape({"q": "p", "a": "x", "b": "y"}, {"chosen": "a", "rejected": "b"}) == ("pair",)
    with pytest.raises(DataError, match=r"cannot tell the row format from columns \['a', 'q'\]"):
        detect_row_format({"q": 1, "a": 2}, LOC)


def _located(rows):
    return [(Location("rows.jsonl", i), row) for i, row in enumerate(rows, start=1)]


def test_iter_parse_skip_counts_per_reason_and_raise_stops():
    rows = _located([{"prompt": "p", "chosen": "a", "rejected": "b"},
                     {"prompt": "p", "chosen": "a"},
                     {"prompt": "p", "chosen": "a", "rejected": "a"},
                     {"prompt": "p", "chosen": "a", "rejected": "a"},
                     {"prompt": "p", "chosen": "c", "rejected": "d"}])
    summary = LoadSummary()
    examples = list(iter_parse(rows, on_error="skip", summary=summary))
    assert [e["source"] for e in examples] == ["rows.jsonl:1", "rows.jsonl:5"]
    assert dict(summary.skipped) == {"missing_field": 1, "identical_responses": 2}
    assert summary.examples == 2 and summary.num_skipped == 3
    assert summary.first_errors["identical_responses"].startswith("rows.jsonl, line 3:")
    assert "skipped 3 bad rows" in str(summary)
    with pytest.raises(DataError, match="rows.jsonl, line 2: field 'rejected': missing"):
        list(iter_parse(rows))


def test_iter_parse_auto_shape_is_fixed_by_the_first_good_row():
    rows = _located([{"prompt": "p"},  # no shape: skipped
                     {"prompt": "p", "completion": "c", "label": 1},
                     {"prompt": "p", "chosen": "a", "rejected": "b"}])  # not unpaired: skipped
    summary = LoadSummary()
    examples = list(iter_parse(rows, on_error="skip", summary=summary))
    assert [e["kind"] for e in examples] == ["unpaired"]
    assert dict(summary.skipped) == {"unknown_format": 1, "missing_field": 1}
    assert summary.row_format == "trl_unpaired"


def test_bad_on_error_value():
    with pytest.raises(ValueError, match="on_error must be one of"):
        list(iter_parse([], on_error="ignore"))
