"""prefjax.data.sources: random-access sources from files, prepared TFDS directories and builder names."""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest

from prefjax.data import builders
from prefjax.data.readers import read_examples
from prefjax.data.records import DataError
from prefjax.data.sources import ListSource, TfdsSource, load_source

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "data"


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def leaves(value):
    """Every scalar inside nested dicts/lists."""
    if isinstance(value, dict):
        for v in value.values():
            yield from leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from leaves(v)
    else:
        yield value


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared chat-pairs dataset with two splits."""
    data_dir = tmp_path_factory.mktemp("tfds")
    files = {"train": fixture("pairs_chat.jsonl"), "test": fixture("pairs_text.csv")}
    directory = builders.prepare_files(files, data_dir=data_dir, name="mixed")
    return data_dir, directory


# -- files -------------------------------------------------------------------------------------

def test_files_give_an_in_memory_source():
    source = load_source([fixture("pairs_text.jsonl"), fixture("pairs_chat.parquet")])
    expected = list(read_examples([fixture("pairs_text.jsonl"), fixture("pairs_chat.parquet")]))
    assert isinstance(source, ListSource) and len(source) == 6
    assert same([source[i] for i in range(len(source))], expected)
    assert same(source[-1], expected[-1])
    with pytest.raises(IndexError):
        source[6]
    assert (source.summary.rows, source.summary.examples, source.summary.num_skipped) == (6, 6, 0)


def test_items_are_copies():
    source = load_source(fixture("pairs_chat.jsonl"))
    first = source[0]
    first["prompt"][0]["content"] = "edited"
    first["weight"] = 0.0
    assert source[0]["prompt"][0]["content"] == "What is two plus two?" and source[0]["weight"] == 1.0


def test_file_options_pass_through():
    fields = {"prompt": "question", "chosen": "response_a", "rejected": "response_b"}
    assert len(load_source(fixture("mapped.jsonl"), fields=fields)) == 2
    source = load_source(fixture("ranked.csv"), shape="ranked", json_columns=("responses", "scores", "ranks"))
    assert [e["scores"] for e in (source[0], source[1])] == [[3.0, 2.0, 1.0], [-2.0, -1.0, -3.0]]
    with pytest.raises(DataError, match=r"ranked\.csv, row 1 \(line 2\): field 'responses': must be a list"):
        load_source(fixture("ranked.csv"), shape="ranked")


def test_skip_mode_reports_its_summary():
    with pytest.raises(DataError):
        load_source(fixture("bad_ranked.jsonl"))
    source = load_source(fixture("bad_ranked.jsonl"), on_error="skip")
    assert len(source) == 1
    assert dict(source.summary.skipped) == {"bad_score": 3, "empty_response": 1, "identical_responses": 1}


# -- prepared TFDS data ------------------------------------------------------------------------

def test_prepared_directory(prepared):
    _, directory = prepared
    source = load_source(directory, split="train")
    assert isinstance(source, TfdsSource) and source.kind == "pair" and len(source) == 3
    examples = [source[i] for i in range(len(source))]
    assert same(examples, list(read_examples(fixture("pairs_chat.jsonl"))))
    assert all(not isinstance(v, bytes) for e in examples for v in leaves(e))  # str, never bytes
    assert isinstance(examples[0]["prompt"][0]["content"], str)
    assert same(source.__getitems__([2, 0]), [examples[2], examples[0]])
    assert same(source[-1], examples[-1])
    with pytest.raises(IndexError):
        source[3]
    assert source.load_summary["examples"] == 3
    test = load_source(directory, split="test")
    assert same([test[i] for i in range(len(test))], list(read_examples(fixture("pairs_text.csv"))))


def test_split_slices(prepared):
    _, directory = prepared
    assert [e["source"] for e in load_source(directory, split="train[1:]")] == [
        f"{fixture('pairs_chat.jsonl')}:2", f"{fixture('pairs_chat.jsonl')}:3"]


def test_builder_name_after_preparation(prepared):
    data_dir, directory = prepared
    by_name = load_source("tfds:preference_files/mixed", data_dir=data_dir, split="train")
    by_dir = load_source(directory, split="train")
    assert same([by_name[i] for i in range(3)], [by_dir[i] for i in range(3)])


def test_tfds_source_pickles(prepared):
    _, directory = prepared
    source = load_source(directory, split="train")
    copy = pickle.loads(pickle.dumps(source))
    assert same(copy[1], source[1])


def test_grain_reads_both_kinds_of_source(prepared):
    grain = pytest.importorskip("grain")
    _, directory = prepared
    for source in (load_source(directory, split="train"), load_source(fixture("pairs_chat.jsonl"))):
        dataset = grain.MapDataset.source(source).map(lambda e: e["chosen"][0]["content"])
        assert list(dataset) == ["Four.", "Apple.", "Chat."]


def test_named_builder_prepared_from_manual_dir(tmp_path):
    kwargs = dict(data_dir=tmp_path, split="validation")
    with pytest.raises(FileNotFoundError, match="helpsteer2/ranked is not prepared.*prepare=True"):
        load_source("tfds:helpsteer2/ranked", **kwargs)
    source = load_source("tfds:helpsteer2/ranked", prepare=True, manual_dir=FIXTURES / "helpsteer2", **kwargs)
    assert source.kind == "ranked" and len(source) == 1
    assert source[0]["scores"] == [3.0, 1.0]
    again = load_source("tfds:helpsteer2/ranked", **kwargs)  # prepared now: no manual_dir needed
    assert same(again[0], source[0])


def test_named_builder_error_policy(tmp_path):
    kwargs = dict(prepare=True, manual_dir=FIXTURES / "hh_rlhf")
    with pytest.raises(DataError, match=r"train\.jsonl, line 3: field 'chosen\[1\]\.content': empty"):
        load_source("tfds:hh_rlhf/helpful-base", data_dir=tmp_path / "strict", on_error="raise", **kwargs)
    source = load_source("tfds:hh_rlhf/helpful-base", data_dir=tmp_path / "default", **kwargs)
    assert len(source) == 2  # public datasets skip bad rows by default, and count them
    assert source.load_summary["skipped"] == {"empty_response": 1, "identical_responses": 1}


def test_bad_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # no data_dir: TFDS's default
    with pytest.raises(FileNotFoundError, match="helpsteer2/pairs is not prepared under .*data.data_dir"):
        load_source("tfds:helpsteer2/pairs")
    with pytest.raises(FileNotFoundError, match="not a prepared TFDS dataset"):
        load_source(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_source(tmp_path / "nothing.jsonl")


def test_a_tfds_builder_trains_from_the_trainer_config(tmp_path):
    """data.source="tfds:<builder>/<config>" with data.data_dir and data.split reaches the trainer:
    the run reads the prepared split (the eval split too) and trains."""
    from prefjax import train  # pylint: disable=import-outside-toplevel
    from prefjax.train import config_lib  # pylint: disable=import-outside-toplevel

    data_dir = tmp_path / "tfds"
    builders.prepare_files({"train": fixture("pairs_chat.jsonl"), "test": fixture("pairs_chat.jsonl")},
                           data_dir=data_dir, name="chat")
    c = config_lib.trainer_config()
    c.model.hf_folder = str(FIXTURES.parent / "hf" / "qwen2")
    c.total_steps, c.data.batch_size, c.data.max_len = 2, 8, 128
    c.data.source = c.data.eval_source = "tfds:preference_files/chat"
    c.data.data_dir, c.data.split, c.data.eval_split = str(data_dir), "train[:2]", "test"
    c.checkpoint.export_hf = False
    c.eval_batches = 1
    summary = train.run(c, str(tmp_path / "run"))
    assert summary["step"] == 2 and "eval/loss" in summary
    c.data.split = "validation"
    with pytest.raises(Exception, match="validation"):
        train.run(c, str(tmp_path / "run2"))
