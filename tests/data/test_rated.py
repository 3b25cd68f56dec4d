"""Rated examples (one response + L attribute ratings, for regression reward models): the canonical
layout (ratings as a dict or a list) and HelpSteer2's columns, detection, located errors, the
choice of attributes by name, batches with scores [B, L], and the trainer's stream end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from prefjax.data import formats, streams
from prefjax.data.batching import build_batch
from prefjax.data.builders import codec
from prefjax.data.packing import LayoutConfig
from prefjax.data.pipeline import DataConfig, Pipeline
from prefjax.data.readers import read_examples
from prefjax.data.records import DataError, LoadSummary, Location, parse_row
from prefjax.data.sources import ListSource
from prefjax.data.tokenize import PreprocessError, RenderOptions, rating_scores, tokenize_example
from prefjax.models.tokenizer import load_tokenizer
from prefjax.train import config_lib
from tests.data.fixture_helpers import bot, user

TOKENIZER = load_tokenizer(Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "qwen2")
HS2 = formats.HELPSTEER2_ATTRIBUTES
LOC = Location("rated.jsonl", 4)


def nan_equal(a, b) -> bool:
    return np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64), equal_nan=True)


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def helpsteer2_row(i, **ratings):
    values = dict(zip(HS2, (i % 5, 4 - i % 5, 3, 1, 2)))
    values.update(ratings)
    return {"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}.", **values}


# -- parsing the canonical layout ------------------------------------------------------------------

def test_dict_ratings_keep_their_names_and_order_and_null_is_not_rated():
    row = {"prompt": "Hi", "response": "Hello!", "ratings": {"safety": 4, "helpfulness": "2.5", "style": None},
           "weight": 2}
    example = parse_row(row, "rated", LOC)
    assert example == {**example, "kind": "rated", "format": "text", "prompt": [user("Hi")],
                       "response": [bot("Hello!")], "weight": 2.0, "source": "rated.jsonl:4"}
    assert list(example["ratings"]) == ["safety", "helpfulness", "style"]
    assert nan_equal(list(example["ratings"].values()), [4.0, 2.5, math.nan])


def test_list_ratings_stay_positional():
    example = parse_row({"prompt": "Hi", "response": "Hello!", "ratings": [1, 0.5, None]}, "rated", LOC)
    assert isinstance(example["ratings"], list) and nan_equal(example["ratings"], [1.0, 0.5, math.nan])


def test_message_lists_split_like_other_kinds():
    # A response that repeats the prompt loses it; without a prompt, what precedes the trailing
    # assistant messages is the prompt (as for unpaired completions).
    conversation = [user("Hi"), bot("Hello."), user("Name a colour.")]
    repeated = parse_row({"prompt": conversation, "response": conversation + [bot("Blue.")],
                          "ratings": [3]}, "rated", LOC)
    implicit = parse_row({"response": conversation + [bot("Blue.")], "ratings": [3]}, "rated", LOC)
    for example in (repeated, implicit):
        assert (example["format"], example["prompt"], example["response"]) == ("chat", conversation, [bot("Blue.")])


@pytest.mark.parametrize("ratings, field, message, reason", [
    ({"helpfulness": "high"}, "ratings.helpfulness", "must be a number (or null when not rated), got 'high'",
     "bad_score"),
    ([1, True], "ratings[1]", "must be a number (or null when not rated), got True", "bad_score"),
    ([2, float("inf")], "ratings[1]", "must be a number (or null when not rated), got inf", "bad_score"),
    ({"a": None, "b": math.nan}, "ratings", "rates nothing: every rating is null or NaN", "missing_field"),
    ({}, "ratings", "has no ratings", "missing_field"),
    ("3", "ratings", "must be a dict {attribute: rating} or a list of ratings, got str", "wrong_type"),
])
def test_a_bad_rating_names_file_line_and_field(tmp_path, ratings, field, message, reason):
    good = {"prompt": "Hi", "response": "Hello!", "ratings": {"helpfulness": 3}}
    path = write_jsonl(tmp_path / "rated.jsonl", [good, {**good, "ratings": ratings}])
    with pytest.raises(DataError) as err:
        list(read_examples(path))
    assert str(err.value) == f"{path}, line 2: field '{field}': {message}"
    assert err.value.reason == reason
    summary = LoadSummary()
    assert len(list(read_examples(path, on_error="skip", summary=summary))) == 1
    assert dict(summary.skipped) == {reason: 1} and summary.row_format == "rated"


def test_renamed_columns_are_named_as_the_file_spells_them():
    row = {"question": "Hi", "answer": "Hello!", "scores_by_aspect": {"helpfulness": "n/a"}}
    with pytest.raises(DataError, match=r"field 'scores_by_aspect\.helpfulness \(ratings\)': must be a number"):
        formats.parse_as("auto", row, LOC, fields={"prompt": "question", "response": "answer",
                                                   "ratings": "scores_by_aspect"})


# -- HelpSteer2 rows ------------------------------------------------------------------------------

def test_helpsteer2_rows_are_detected_and_give_the_five_attributes_in_order(tmp_path, caplog):
    multi_turn = {"prompt": "Hi\n<extra_id_1>Assistant\nHello!\n<extra_id_1>User\nWhat is 2 + 2?",
                  "response": "4.", "verbosity": 0, "helpfulness": 4, "correctness": 4, "coherence": 4}
    path = write_jsonl(tmp_path / "hs2.jsonl", [helpsteer2_row(1), multi_turn])
    assert formats.detect_row_format(multi_turn, LOC).name == "helpsteer2"
    summary = LoadSummary()
    with caplog.at_level("WARNING", logger="prefjax.data.formats"):
        first, second = read_examples(path, summary=summary)
    assert summary.row_format == "helpsteer2"
    assert any("rows look like helpsteer2" in r.getMessage() for r in caplog.records)
    assert first["kind"] == "rated" and first["format"] == "chat"  # every example a conversation
    assert first["prompt"] == [user("Question 1: what is 1 plus 1?")] and first["response"] == [bot("It is 2.")]
    assert list(first["ratings"].items()) == list(zip(HS2, (1.0, 3.0, 3.0, 1.0, 2.0)))
    assert second["prompt"] == [user("Hi"), bot("Hello!"), user("What is 2 + 2?")]
    # The five attributes in the card's order whatever the column order; a missing column is not rated.
    assert list(second["ratings"]) == list(HS2)
    assert nan_equal(list(second["ratings"].values()), [4, 4, 4, math.nan, 0])


def test_a_bad_helpsteer2_rating_names_its_column(tmp_path):
    path = write_jsonl(tmp_path / "hs2.jsonl", [helpsteer2_row(0), helpsteer2_row(1, correctness="4/5")])
    with pytest.raises(DataError) as err:
        list(read_examples(path))
    assert str(err.value) == (f"{path}, line 2: field 'correctness': must be a number (or null when not rated), "
                              "got '4/5'")
    none_rated = {"prompt": "Hi", "response": "Yo", **{name: None for name in HS2}}
    with pytest.raises(DataError) as err:
        formats.parse_as("helpsteer2", none_rated, LOC)
    assert str(err.value) == ("rated.jsonl, line 4: rates nothing: helpfulness, correctness, coherence, complexity, "
                              "verbosity are all missing or null")


def test_rated_examples_round_trip_through_the_tfds_codec():
    example = parse_row({"prompt": "Hi", "response": "Yo", "ratings": {"a": 1.5, "b": None}}, "rated", LOC)
    stored = codec.encode(example)
    assert codec.kind_of(stored) == "rated"
    back = codec.decode(stored, "rated")
    assert list(back["ratings"]) == ["a", "b"] and nan_equal(list(back["ratings"].values()), [1.5, math.nan])


def test_helpsteer2_files_prepare_as_a_rated_tfds_dataset(tmp_path):
    from prefjax.data.builders import prepare_files  # imports TFDS
    from prefjax.data.sources import load_source

    path = write_jsonl(tmp_path / "hs2.jsonl", [helpsteer2_row(0, verbosity=None), helpsteer2_row(1)])
    source = load_source(prepare_files(path, data_dir=tmp_path / "tfds"), split="train")
    assert source.kind == "rated" and len(source) == 2
    expected = list(read_examples(path))
    for i in range(2):
        assert json.dumps(source[i]) == json.dumps(expected[i])  # NaN kept, names in order


# -- which attributes, in which order -------------------------------------------------------------

def test_rating_scores_follow_the_labels():
    example = {"ratings": {"helpfulness": 3.0, "verbosity": 1.0, "coherence": math.nan}, "source": "f.jsonl:7"}
    assert nan_equal(rating_scores(example), [3.0, 1.0, math.nan])
    # Order from the labels; an attribute the dict leaves out is not rated, like a null.
    assert nan_equal(rating_scores(example, ("verbosity", "correctness", "helpfulness")), [1.0, math.nan, 3.0])
    with pytest.raises(PreprocessError) as err:
        rating_scores(example, ("Helpfulness", "safety"))
    assert str(err.value) == ("f.jsonl:7: field 'ratings' rates none of the reward model's labels ['Helpfulness', "
                              "'safety']; it rates ['helpfulness', 'verbosity', 'coherence']: set reward.labels to "
                              "the attribute names the data uses")
    positional = {"ratings": [1.0, 2.0], "source": "f.jsonl:8"}
    assert rating_scores(positional, ("x", "y")) == (1.0, 2.0)
    with pytest.raises(PreprocessError) as err:
        rating_scores(positional, ("x", "y", "z"))
    assert str(err.value) == ("f.jsonl:8: field 'ratings' has 2 ratings but the reward model has 3 labels ['x', "
                              "'y', 'z']: give every row one rating per label (or ratings as a dict by name)")


def test_tokenized_rated_example_has_one_response_ending_in_its_eos_and_l_scores():
    example = formats.parse_as("auto", helpsteer2_row(2), LOC)
    tokenized = tokenize_example(example, TOKENIZER, RenderOptions(rating_labels=("correctness", "helpfulness")))
    assert tokenized.kind == "rated" and tokenized.num_responses == 1 and tokenized.scores == (2.0, 2.0)
    ids, mask = tokenized.sequence(0)
    assert TOKENIZER.decode(ids[mask > 0].tolist()) == "It is 4.<|im_end|>"  # the last real token is scored


# -- batches ----------------------------------------------------------------------------------------

def _tokenized(ratings_list, labels=("a", "b", "c")):
    examples = [{"kind": "rated", "format": "text", "prompt": [user(f"p{i}")], "response": [bot("r" * (i + 1))],
                 "ratings": ratings, "weight": 1.0 + i, "source": f"m:{i}"} for i, ratings in enumerate(ratings_list)]
    return [tokenize_example(e, TOKENIZER, RenderOptions(rating_labels=labels)) for e in examples]


@pytest.mark.parametrize("pack", [False, True])
def test_a_rated_batch_has_scores_b_by_l_and_nan_fillers(pack):
    tokenized = _tokenized([{"a": 1, "b": 2, "c": 3}, {"c": 0.5, "a": None}, [4, 5, 6]])
    layout = LayoutConfig(max_len=32, pack=pack, pack_rows=2 if pack else None)
    batch, left_out = build_batch(tokenized, 5, 1, layout, pad_id=0, kind="rated")
    assert left_out == 0 and batch.num_responses == 1 and batch.scores.shape == (5, 3)
    assert batch.scores.dtype == np.float32
    assert nan_equal(batch.scores, [[1, 2, 3], [math.nan, math.nan, 0.5], [4, 5, 6]] + [[math.nan] * 3] * 2)
    assert np.isfinite(batch.scores).sum(axis=1).tolist() == [3, 1, 3, 0, 0]  # the loss's mask
    assert batch.weight.tolist() == [1.0, 2.0, 3.0, 0.0, 0.0]
    if not pack:  # row b is example b's one response
        assert batch.tokens.shape[0] == 5 and (batch.example_id.max(axis=1) == np.arange(5)).all()
    # A batch of fillers only (end of data) still has L columns when told.
    fillers, _ = build_batch([], 5, 1, layout, pad_id=0, kind="rated", num_scores=3)
    assert fillers.scores.shape == (5, 3) and np.isnan(fillers.scores).all() and not fillers.weight.any()


def test_examples_rating_different_attribute_counts_cannot_share_a_batch():
    mixed = _tokenized([{"a": 1}], labels=("a",)) + _tokenized([{"a": 1, "b": 2}], labels=("a", "b"))
    with pytest.raises(ValueError, match=r"m:0: a batch needs 1 scores per example \(ratings of one set of "
                       r"attributes\); this example has 2"):
        build_batch(mixed, 2, 1, LayoutConfig(max_len=32), pad_id=0)


# -- the pipeline and the trainer's stream ------------------------------------------------------------

def _rated_source(n):
    rows = [parse_row({"prompt": f"question {i}", "response": "answer " * (1 + i % 3),
                       "ratings": {"b": float(i), "a": -float(i)} if i % 4 else {"a": 0.0}}, "rated",
                      Location("mem", i)) for i in range(n)]
    for i, row in enumerate(rows):
        row["weight"] = 1.0 + i  # tells which example a batch slot holds
    return ListSource(rows)


@pytest.mark.parametrize("layout", [{}, {"pack": True, "pack_rows": 2, "fill_packed_rows": True}])
def test_the_pipeline_batches_rated_examples_by_the_first_examples_names(layout):
    source = _rated_source(6)  # example 0 rates only "a": its names fix L = 1
    config = DataConfig.from_mapping({"batch_size": 4, "max_len": 64, "buckets": 16, "shuffle": False,
                                      "read_threads": 1, **layout})
    pipe = Pipeline(source, TOKENIZER, config)
    assert (pipe.kind, pipe.num_responses, pipe.rating_labels) == ("rated", 1, ("a",))
    batches = list(pipe)
    seen = {}
    for batch in batches:
        assert batch.num_responses == 1 and batch.scores.shape == (4, 1)
        for weight, scores in zip(batch.weight, batch.scores):
            if weight:
                seen[int(weight) - 1] = scores[0]
            else:
                assert np.isnan(scores).all()
    assert seen == {i: 0.0 if i % 4 == 0 else -float(i) for i in range(6)}


def test_the_pipeline_reads_the_named_attributes_in_order():
    config = DataConfig.from_mapping({"batch_size": 8, "max_len": 64, "shuffle": False, "read_threads": 1,
                                      "rating_labels": ["b", "a"]})
    batch = next(iter(Pipeline(_rated_source(5), TOKENIZER, config)))
    assert nan_equal(batch.scores[:5], [[math.nan, 0.0], [1, -1], [2, -2], [3, -3], [math.nan, 0.0]])
    assert batch.scores.shape == (8, 2)


def _trainer_config(path, **reward):
    config = config_lib.trainer_config()
    config.loss_name = "rating_regression"
    config.data.source = str(path)
    config.data.batch_size, config.data.max_len, config.data.shuffle, config.data.num_epochs = 4, 96, False, 1
    config.reward.num_labels = reward.pop("num_labels", 5)
    config.reward.labels = reward.pop("labels", ())
    return config


def test_helpsteer2_rows_through_the_trainers_stream(tmp_path):
    path = write_jsonl(tmp_path / "hs2.jsonl", [helpsteer2_row(i) for i in range(3)])
    config = _trainer_config(path)
    kind = config_lib.data_kind(config.loss_name, config.reward.num_labels)
    assert kind == "rated"
    stream = streams.make_stream(config, str(path), kind=kind, vocab_size=1000, tokenizer=TOKENIZER, train=True)
    try:
        batch = next(stream)
    finally:
        stream.close()
    assert stream.rating_labels == HS2 and stream.num_responses == 1 and batch.num_responses == 1
    assert batch.scores.shape == (4, 5) and batch.weight.tolist() == [1, 1, 1, 0]
    expected = [[i % 5, 4 - i % 5, 3, 1, 2] for i in range(3)] + [[math.nan] * 5]
    assert nan_equal(batch.scores, expected)
    # Reward outputs named by reward.labels: those columns, in that order.
    config = _trainer_config(path, num_labels=2, labels=("verbosity", "helpfulness"))
    stream = streams.make_stream(config, str(path), kind="rated", vocab_size=1000, tokenizer=TOKENIZER, train=True)
    try:
        assert nan_equal(next(stream).scores[:3], [[2, 0], [2, 1], [2, 2]])
    finally:
        stream.close()


def test_a_stream_whose_data_rates_another_number_of_attributes_says_so(tmp_path):
    path = write_jsonl(tmp_path / "hs2.jsonl", [helpsteer2_row(0)])
    with pytest.raises(streams.DataKindError) as err:
        streams.make_stream(_trainer_config(path, num_labels=3), str(path), kind="rated", vocab_size=1000,
                            tokenizer=TOKENIZER, train=True)
    assert str(err.value) == (f"data.source='{path}' rates 5 attributes ['helpfulness', 'correctness', 'coherence', "
                              "'complexity', 'verbosity'], but reward.num_labels=3: set reward.num_labels=5, or "
                              "reward.labels to the 3 attributes to train on")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(streams.DataKindError, match=r"holds pair examples, but loss 'rating_regression' trains on "
                       r"rated examples \(prompt \+ response \+ ratings, or HelpSteer2 rows\)"):
        streams.load_examples(_trainer_config(pairs), str(pairs), kind="rated", train=True)


def test_synthetic_rated_batches_have_one_response_and_l_scores():
    config = _trainer_config("synthetic", num_labels=3)
    stream = streams.make_stream(config, "synthetic", kind="rated", vocab_size=50, tokenizer=None, train=True)
    batch = next(stream)
    assert batch.num_responses == 1 and batch.scores.shape == (4, 3) and batch.tokens.shape[0] == 4


def test_label_noise_is_refused_for_rated_data():
    config = DataConfig.from_mapping({"batch_size": 2, "max_len": 64, "label_noise": 0.1})
    with pytest.raises(ValueError, match="label_noise is defined for pair and unpaired data, not rated"):
        Pipeline(_rated_source(2), TOKENIZER, config)
