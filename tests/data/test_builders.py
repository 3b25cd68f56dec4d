"""prefjax.data.builders: TFDS array_record datasets from local files and from the public datasets'
fixture files (manual_dir; never the network), read back equal to the directly parsed examples."""

from __future__ import annotations

import glob
import gzip
import json
import math
import os
import pathlib
import shutil

import pytest
import tensorflow_datasets as tfds

from prefjax.data import builders
from prefjax.data.builders import codec, helpsteer2, hh_rlhf
from prefjax.data.readers import read_examples
from prefjax.data.records import DataError, Location
from tests.data.fixture_helpers import FIXTURES, bot, fixture, same, user



def read_back(directory: str, split: str) -> list[dict]:
    """Reads a prepared split with plain TFDS (no prefjax source) and decodes each record."""
    builder = tfds.builder_from_directory(directory)
    kind = codec.kind_of(builder.info.features.keys())
    data = builder.as_data_source(split=split)
    return [codec.decode(data[i], kind) for i in range(len(data))]


def prepare_named(builder_cls, data_dir, manual_dir, config=None, **kwargs):
    builder = builder_cls(data_dir=str(data_dir), config=config, **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


# -- local files -------------------------------------------------------------------------------

LOCAL_CASES = [  # (files, json_columns)
    ("pairs_text.jsonl", ()),
    ("pairs_chat.parquet", ()),
    ("unpaired.csv", ()),
    ("ranked.json", ()),
    ("ranked.csv", ("responses", "scores", "ranks")),
    ("ranked_chat.jsonl", ()),
]


@pytest.mark.parametrize("name,json_columns", LOCAL_CASES)
def test_local_files_prepare_and_read_back_equal(tmp_path, name, json_columns):
    path = fixture(name)
    directory = builders.prepare_files({"train": path, "test": path}, data_dir=tmp_path,
                                       json_columns=json_columns)
    expected = list(read_examples(path, json_columns=json_columns))
    assert directory == str(tmp_path / "preference_files" / name.split(".")[0] / "1.0.0")
    assert glob.glob(os.path.join(directory, "preference_files-train.array_record-*"))
    for split in ("train", "test"):
        assert same(read_back(directory, split), expected)  # file order kept, sources included


def test_stored_columns_are_json_text_and_floats_exact(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 0.1 + 0.2, "margin": 1e-300},
            {"prompt": "q", "chosen": "c", "rejected": "d", "weight": 1 / 3}]
    (tmp_path / "f.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    directory = builders.prepare_files(tmp_path / "f.jsonl", data_dir=tmp_path / "tfds", shape="pair")
    builder = tfds.builder_from_directory(directory)
    assert set(builder.info.features.keys()) == set(codec.FEATURE_KEYS["pair"])
    raw = builder.as_data_source(split="train")[0]
    assert isinstance(raw["chosen"], bytes) and json.loads(raw["chosen"]) == [bot("a")]
    back = read_back(directory, "train")
    # float32 storage would turn 0.30000000000000004 into 0.30000001192092896 and 1e-300 into 0.
    assert back[0]["score_chosen"] == 0.1 + 0.2 and back[0]["margin"] == 1e-300
    assert back[1]["weight"] == 1 / 3 and math.isnan(back[1]["score_chosen"])


def test_skipped_rows_are_recorded_in_the_metadata(tmp_path):
    directory = builders.prepare_files(fixture("bad_pairs.jsonl"), data_dir=tmp_path, shape="pair",
                                       on_error="skip")
    summary = tfds.builder_from_directory(directory).info.metadata["load_summary"]["train"]
    assert summary["rows"] == 11 and summary["examples"] == 2
    assert summary["skipped"] == {"missing_field": 1, "empty_response": 1, "identical_responses": 1,
                                  "wrong_type": 1, "bad_role": 1, "bad_score": 2, "bad_json": 1, "bad_row": 1}
    assert len(read_back(directory, "train")) == 2


def test_local_files_raise_by_default(tmp_path):
    with pytest.raises(DataError, match=r"bad_pairs\.jsonl, line 2: field 'rejected': missing"):
        builders.prepare_files(fixture("bad_pairs.jsonl"), data_dir=tmp_path, shape="pair")


def test_field_mapping_and_config_name(tmp_path):
    fields = {"prompt": "question", "chosen": "response_a", "rejected": "response_b"}
    directory = builders.prepare_files(fixture("mapped.jsonl"), data_dir=tmp_path, fields=fields,
                                       name="capitals")
    assert directory.endswith(os.path.join("preference_files", "capitals", "1.0.0"))
    assert [e["chosen"] for e in read_back(directory, "train")] == [[bot("Rome.")], [bot("The Pacific.")]]


def test_existing_dataset_is_reused_unless_overwrite(tmp_path):
    data = tmp_path / "p.jsonl"
    shutil.copy(fixture("pairs_text.jsonl"), data)
    directory = builders.prepare_files(data, data_dir=tmp_path / "tfds")
    lines = data.read_text().splitlines()
    data.write_text(lines[0] + "\n")
    assert len(read_back(builders.prepare_files(data, data_dir=tmp_path / "tfds"), "train")) == 3
    rebuilt = builders.prepare_files(data, data_dir=tmp_path / "tfds", overwrite=True)
    assert len(read_back(rebuilt, "train")) == 1
    assert directory == builders.prepare_files(data, data_dir=tmp_path / "tfds")


def test_config_without_files(tmp_path):
    with pytest.raises(ValueError, match="needs config=PreferenceFilesConfig"):
        builders.PreferenceFiles(data_dir=str(tmp_path))
    config = builders.PreferenceFilesConfig(name="x")
    builder = builders.PreferenceFiles(data_dir=str(tmp_path), config=config)
    with pytest.raises(ValueError, match="lists no files"):
        builder.download_and_prepare()


# -- Anthropic HH-RLHF -------------------------------------------------------------------------

def test_parse_dialogue():
    loc = Location("hh.jsonl", 1)
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:"
    expected = [user("Hi there"), bot("Hello!"), user("Bye"), bot("")]
    assert hh_rlhf.parse_dialogue(text, loc, "chosen") == expected
    assert hh_rlhf.parse_dialogue("Human: a\n\nAssistant: b", loc, "chosen") == [user("a"), bot("b")]
    with pytest.raises(DataError, match=r"hh\.jsonl, line 1: field 'rejected': dialogue text must start"):
        hh_rlhf.parse_dialogue("Hello\n\nAssistant: b", loc, "rejected")


def test_hh_rlhf_from_fixture_files(tmp_path):
    builder = prepare_named(builders.HhRlhf, tmp_path, FIXTURES / "hh_rlhf", config="helpful-base")
    train = read_back(builder.data_dir, "train")
    source = fixture("hh_rlhf/helpful-base/train.jsonl")
    assert [e["source"] for e in train] == [f"{source}:1", f"{source}:2"]
    assert train[0]["prompt"] == [user("What is a good name for a cat?")]
    assert train[0]["chosen"] == [bot("Whiskers is a classic choice.")]
    assert train[1]["prompt"] == [user("Hi, can you help me bake bread?"),
                                  bot("Sure. Do you have flour and yeast?"), user("Yes, both.")]
    assert train[1]["rejected"] == [bot("Buy bread instead.")]
    assert all(e["format"] == "chat" and e["kind"] == "pair" for e in train)
    # line 3: empty final reply, line 4: identical texts
    assert builder.info.metadata["load_summary"]["train"]["skipped"] == {"empty_response": 1,
                                                                         "identical_responses": 1}
    test = read_back(builder.data_dir, "test")
    assert [e["chosen"] for e in test] == [[bot("No, it is made of rock.")], [bot("5 is bigger.")]]


def test_hh_rlhf_gzipped_manual_copies_and_strict_mode(tmp_path):
    manual = tmp_path / "manual" / "helpful-base"
    manual.mkdir(parents=True)
    for split in ("train", "test"):
        data = pathlib.Path(fixture(f"hh_rlhf/helpful-base/{split}.jsonl")).read_bytes()
        (manual / f"{split}.jsonl.gz").write_bytes(gzip.compress(data))
    builder = prepare_named(builders.HhRlhf, tmp_path / "a", tmp_path / "manual", config="helpful-base")
    assert len(read_back(builder.data_dir, "train")) == 2
    with pytest.raises(DataError, match=r"train\.jsonl\.gz, line 3: field 'chosen\[1\]\.content': empty"):
        prepare_named(builders.HhRlhf, tmp_path / "b", tmp_path / "manual", config="helpful-base",
                      on_error="raise")


def test_hh_rlhf_missing_manual_files_are_listed(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks \['harmless-base/train\.jsonl\.gz'"):
        prepare_named(builders.HhRlhf, tmp_path, FIXTURES / "hh_rlhf", config="all")


class FakeDownloadManager:
    """Records download() calls and answers with fixture files; no manual dir, no network."""

    def __init__(self, answers):
        self.answers, self.requested = answers, None

    @property
    def manual_dir(self):
        raise AssertionError("Manual directory not enabled.")

    def download(self, urls):
        self.requested = urls
        return {split: [self.answers[url] for url in split_urls] for split, split_urls in urls.items()}


HF = "https://huggingface.co/datasets"


@pytest.mark.parametrize("builder_cls,config,urls,answers", [
    (builders.HhRlhf, "helpful-base",
     {"train": [f"{HF}/Anthropic/hh-rlhf/resolve/main/helpful-base/train.jsonl.gz"],
      "test": [f"{HF}/Anthropic/hh-rlhf/resolve/main/helpful-base/test.jsonl.gz"]},
     ["hh_rlhf/helpful-base/train.jsonl", "hh_rlhf/helpful-base/test.jsonl"]),
    (builders.UltrafeedbackBinarized, None,
     {"train": [f"{HF}/HuggingFaceH4/ultrafeedback_binarized/resolve/main/data/"
                "train_prefs-00000-of-00001.parquet"],
      "test": [f"{HF}/HuggingFaceH4/ultrafeedback_binarized/resolve/main/data/"
               "test_prefs-00000-of-00001.parquet"]},
     ["ultrafeedback_binarized/data/train_prefs-00000-of-00001.parquet",
      "ultrafeedback_binarized/data/test_prefs-00000-of-00001.parquet"]),
    (builders.Helpsteer2, "pairs",
     {"train": [f"{HF}/nvidia/HelpSteer2/resolve/main/train.jsonl.gz"],
      "validation": [f"{HF}/nvidia/HelpSteer2/resolve/main/validation.jsonl.gz"]},
     ["helpsteer2/train.jsonl", "helpsteer2/validation.jsonl"]),
])
def test_named_builders_download_the_hub_files(tmp_path, builder_cls, config, urls, answers):
    flat = [url for split_urls in urls.values() for url in split_urls]
    dl_manager = FakeDownloadManager({url: fixture(answer) for url, answer in zip(flat, answers)})
    builder = builder_cls(data_dir=str(tmp_path), config=config)
    generators = builder._split_generators(dl_manager)
    assert dl_manager.requested == urls
    assert set(generators) == set(urls)
    examples = [key_example for key_example in generators["train"]]
    assert [key for key, _ in examples] == list(range(1, len(examples) + 1)) and examples


# -- UltraFeedback binarized -------------------------------------------------------------------

def test_ultrafeedback_from_fixture_files(tmp_path):
    builder = prepare_named(builders.UltrafeedbackBinarized, tmp_path, FIXTURES / "ultrafeedback_binarized")
    train = read_back(builder.data_dir, "train")
    assert [e["prompt"] for e in train] == [[user("Write a limerick about a fish.")],
                                            [user("Explain photosynthesis in one line.")]]
    assert [e["chosen"] for e in train] == [[bot("A fish with a wish for a dish...")],
                                            [bot("Plants turn light, water and CO2 into sugar and oxygen.")]]
    assert [(e["score_chosen"], e["score_rejected"]) for e in train] == [(8.5, 3.0), (9.0, 6.25)]
    assert builder.info.metadata["load_summary"]["train"]["skipped"] == {"identical_responses": 1}
    test = read_back(builder.data_dir, "test")
    assert [(e["score_chosen"], e["score_rejected"]) for e in test] == [(10.0, 2.0), (7.0, 7.0)]  # tie kept


# -- HelpSteer2 --------------------------------------------------------------------------------

def test_helpsteer2_multi_turn_prompt():
    text = "What is X?\n<extra_id_1>Assistant\nX is Y.\n<extra_id_1>User\nAnd Z?"
    assert helpsteer2.parse_prompt(text) == [user("What is X?"), bot("X is Y."), user("And Z?")]
    assert helpsteer2.parse_prompt("c#") == [user("c#")]


def test_helpsteer2_pairs(tmp_path):
    builder = prepare_named(builders.Helpsteer2, tmp_path, FIXTURES / "helpsteer2", config="pairs")
    train = read_back(builder.data_dir, "train")
    path = fixture("helpsteer2/train.jsonl")
    assert [e["source"] for e in train] == [f"{path}:1", f"{path}:5"]
    assert train[0]["chosen"] == [bot("C# is a programming language developed by Microsoft.")]
    assert train[0]["rejected"] == [bot("A musical note.")]
    assert (train[0]["score_chosen"], train[0]["score_rejected"]) == (3.0, 1.0)
    assert train[1]["prompt"] == [user("What is a list in Python?"), bot("An ordered, mutable sequence."),
                                  user("How do I add an item?")]
    summary = builder.info.metadata["load_summary"]["train"]
    # the haiku rows tie on helpfulness (4, 4); "Name a color." has one response
    assert summary["filtered"] == {"tie": 1, "single_response": 1} and summary["rows"] == 7
    assert len(read_back(builder.data_dir, "validation")) == 1


def test_helpsteer2_ranked_and_another_attribute(tmp_path):
    builder = prepare_named(builders.Helpsteer2, tmp_path, FIXTURES / "helpsteer2", config="ranked")
    train = read_back(builder.data_dir, "train")
    assert [e["scores"] for e in train] == [[3.0, 1.0], [4.0, 0.0]]
    assert train[0]["responses"] == [[bot("C# is a programming language developed by Microsoft.")],
                                     [bot("A musical note.")]]
    config = builders.Helpsteer2Config(name="pairs_correctness", output="pair", attribute="correctness")
    builder = prepare_named(builders.Helpsteer2, tmp_path, FIXTURES / "helpsteer2", config=config)
    train = read_back(builder.data_dir, "train")
    # by correctness the haiku rows (4 vs 3) make a pair too
    assert [(e["score_chosen"], e["score_rejected"]) for e in train] == [(4.0, 2.0), (4.0, 3.0), (4.0, 0.0)]
    assert train[1]["rejected"] == [bot("Rain falls. It is wet. The end.")]


def test_helpsteer2_bad_config(tmp_path):
    config = builders.Helpsteer2Config(name="bad", output="pair", attribute="niceness")
    with pytest.raises(ValueError, match="attribute must be one of"):
        prepare_named(builders.Helpsteer2, tmp_path, FIXTURES / "helpsteer2", config=config)
