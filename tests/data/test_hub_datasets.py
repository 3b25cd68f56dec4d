"""prefjax.data.hub and load_source("hf:..."): choosing a config's split files by the Hub's
conventions (README configs, data/ and config folders, the parquet-conversion layout), reading
them offline from a fake huggingface_hub cache, split slices, errors; and tfds: sources without
a data_dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefjax import hub_download
from prefjax.data import builders, hub, sources
from prefjax.data.sources import ListSource, load_source
from tests.data.fixture_helpers import fixture, same
from tests.hub_helpers import FakeHubCache

README = """---
license: mit
configs:
- config_name: chat
  default: true
  data_files:
  - split: train
    path: chat/train-*
  - split: test
    path: chat/test-*.parquet
- config_name: text
  data_files: text/*.jsonl
---
# acme/prefs
"""


def _strip(examples):
    return [{k: v for k, v in e.items() if k != "source"} for e in examples]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    fake = FakeHubCache(tmp_path / "hub", monkeypatch)
    fake.main = fake.add("dataset", "acme/prefs", {
        "README.md": README, "chat/train-00000-of-00001.parquet": Path(fixture("pairs_chat.parquet")),
        "chat/test-00000-of-00001.parquet": Path(fixture("pairs_text.parquet")),
        "text/all.jsonl": Path(fixture("pairs_text.jsonl"))})
    fake.v0 = fake.add("dataset", "acme/prefs", {"data/train.jsonl": Path(fixture("pairs_text.jsonl"))}, refs=("v0",))
    monkeypatch.setattr(hub, "_resolved", {})
    return fake


# -- choosing files (pure) ---------------------------------------------------------------------

LAYOUT = ["README.md", ".gitattributes", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
          "data/test-00000-of-00001.parquet", "data/test.jsonl", "data/dev_0.json.gz", "dataset_infos.json"]


@pytest.mark.parametrize("listing, config, split, expected", [
    (LAYOUT, None, "train", LAYOUT[2:4]),
    (LAYOUT, "default", "test", ["data/test-00000-of-00001.parquet"]),  # parquet wins over jsonl
    (LAYOUT, None, "validation", ["data/dev_0.json.gz"]),  # dev stands for validation
    (["train.jsonl", "test.jsonl"], None, "test", ["test.jsonl"]),
    (["en/train-0.parquet", "fr/train-0.parquet"], "fr", "train", ["fr/train-0.parquet"]),
    (["en/train-0.parquet"], None, "train", ["en/train-0.parquet"]),  # the only config
    # refs/convert/parquet: <config>/<split>/NNNN.parquet and partial-<split>
    (["default/train/0000.parquet", "default/train/0001.parquet", "default/partial-test/0000.parquet"],
     "default", "test", ["default/partial-test/0000.parquet"]),
])
def test_layout_conventions(listing, config, split, expected):
    assert hub.pick_files(listing, None, config, split) == expected


def test_readme_configs_block():
    meta = {"configs": [{"config_name": "chat", "default": True,
                         "data_files": [{"split": "train_prefs", "path": ["chat/train_prefs-*", "extra/*.jsonl"]}]},
                        {"config_name": "text", "data_files": "text/**/*.jsonl"},
                        {"config_name": "dir", "data_dir": "d"}]}
    listing = ["chat/train_prefs-00000-of-00001.parquet", "extra/more.jsonl", "extra/deep/no.jsonl",
               "text/a/b.jsonl", "text/c.jsonl", "d/test.parquet", "d/train.parquet"]
    assert hub.pick_files(listing, meta, None, "train_prefs") == listing[:2]  # default: true; * stays in a folder
    assert hub.pick_files(listing, meta, "text", "train") == ["text/a/b.jsonl", "text/c.jsonl"]
    assert hub.pick_files(listing, meta, "dir", "test") == ["d/test.parquet"]


@pytest.mark.parametrize("listing, meta, config, split, message", [
    (LAYOUT, None, None, "tain", r"unknown split 'tain'; its splits: \['dev', 'test', 'train'\]"),
    (LAYOUT, None, "fr", "train", r"unknown config 'fr'; its configs: \['default'\]"),
    (["en/train.jsonl", "fr/train.jsonl"], None, None, "train", r"several configs \['en', 'fr'\]: add ':<config>'"),
    (["README.md", "weights.bin", "notes.txt"], None, None, "train",
     r"no parquet/jsonl/json/csv data files in the repository; found \['weights.bin', 'notes.txt'\]"),
    (["a.arrow"], {"configs": [{"config_name": "x", "data_files": "*.arrow"}]}, None, "train",
     r"no parquet/jsonl/json/csv files match \['\*.arrow'\] for split 'train'; found \['a.arrow'\]"),
    ([], {"configs": [{"config_name": "a", "data_files": "a/*"}, {"config_name": "b", "data_files": "b/*"}]}, None,
     "train", r"several configs \['a', 'b'\]"),
    ([], {"configs": [{"config_name": "a", "data_files": "a/*"}]}, "c", "train",
     r"unknown config 'c'; its configs: \['a'\]"),
    ([], {"configs": [{"config_name": "a", "data_files": "a/*"}]}, None, "test",
     r"unknown split 'test' of config 'a'; its splits: \['train'\]"),
])
def test_no_match_says_what_there_is(listing, meta, config, split, message):
    with pytest.raises(hub.HubDatasetError, match=message):
        hub.pick_files(listing, meta, config, split)


@pytest.mark.parametrize("spec, expected", [
    ("hf:acme/prefs", ("acme/prefs", None, None)),
    ("hf:acme/prefs@v1:chat", ("acme/prefs", "v1", "chat")),
    ("hf:acme/prefs@refs/convert/parquet:default", ("acme/prefs", "refs/convert/parquet", "default")),
    ("hf:acme/prefs:chat", ("acme/prefs", None, "chat")),
])
def test_parse(spec, expected):
    parsed = hub.parse(spec)
    assert (parsed.repo_id, parsed.revision, parsed.config) == expected and str(parsed) == spec


@pytest.mark.parametrize("spec", ["hf:acme", "hf:acme/prefs@", "hf:acme/prefs:", "hf:a/b/c", "hf:acme/pr efs"])
def test_parse_refuses(spec):
    with pytest.raises(hub.HubDatasetError, match=r"^data\.source=.*: not a Hub dataset id; the form is "
                                                  r"'hf:<owner>/<name>\[@revision\]\[:<config>\]'$"):
        hub.parse(spec)


# -- through the cache ---------------------------------------------------------------------------

def test_hf_source_by_config_and_split(cache):
    train = load_source("hf:acme/prefs", split="train")  # the default config (default: true)
    assert isinstance(train, ListSource)
    assert same(_strip(train), _strip(load_source(fixture("pairs_chat.parquet"))))
    test = load_source("hf:acme/prefs:chat", split="test", shape="pair")
    assert same(_strip(test), _strip(load_source(fixture("pairs_text.parquet"))))
    text = load_source("hf:acme/prefs:text", split="train")
    assert same(_strip(text), _strip(load_source(fixture("pairs_text.jsonl"))))
    assert str(cache.storage("dataset", "acme/prefs") / "snapshots" / cache.main) in train[0]["source"]


def test_revision_pinning(cache):
    for spec in ("hf:acme/prefs@v0", f"hf:acme/prefs@{cache.v0}"):
        source = load_source(spec)
        assert same(_strip(source), _strip(load_source(fixture("pairs_text.jsonl"))))
        assert f"/snapshots/{cache.v0}/data/train.jsonl" in source[0]["source"]
    assert hub.identity("hf:acme/prefs@v0", "train[:1]") == f"hf:acme/prefs@{cache.v0}|train[:1]"
    assert hub.identity("hf:acme/prefs:text", "train") == f"hf:acme/prefs@{cache.main}:text|train"


@pytest.mark.parametrize("split, first, count", [("train[:1]", 0, 1), ("train[1:]", 1, 2), ("train[-1:]", 2, 1),
                                                 ("train[:67%]", 0, 2), ("train[34%:]", 1, 2)])
def test_split_slices(cache, split, first, count):
    full = load_source("hf:acme/prefs:text")
    part = load_source("hf:acme/prefs:text", split=split)
    assert len(part) == count and same(part[0], full[first])
    assert part.summary.rows == 3  # what was read


def test_bad_split_syntax(cache):
    with pytest.raises(ValueError, match=r"^data\.eval_split='train\+test': expected a split name, optionally "
                                         r"sliced as in 'train\[:1000\]'"):
        load_source("hf:acme/prefs", split="train+test", key="data.eval_source")


def test_errors_through_the_cache(cache):
    with pytest.raises(hub.HubDatasetError, match=r"^data\.source='hf:acme/prefs:chat': unknown split 'dev' of "
                                                  r"config 'chat'; its splits: \['test', 'train'\] \(offline: only "
                                                  r"the files in the Hugging Face cache were looked at\)$"):
        load_source("hf:acme/prefs:chat", split="dev")
    with pytest.raises(hub.HubDatasetError, match=r"unknown config 'code'; its configs: \['chat', 'text'\]"):
        load_source("hf:acme/prefs:code")
    with pytest.raises(hub_download.HubError, match=r"^data\.eval_source='hf:acme/absent': acme/absent is not in the "
                                                  r"Hugging Face cache .* \(hf download acme/absent --repo-type "
                                                  r"dataset\) or unset HF_HUB_OFFLINE$"):
        load_source("hf:acme/absent", key="data.eval_source")


def test_only_the_chosen_files_are_asked_for(cache, monkeypatch):
    asked = []
    real = hub.hub_download.snapshot

    def spy(repo_id, **kwargs):
        asked.append(kwargs["allow_patterns"])
        return real(repo_id, **kwargs)

    monkeypatch.setattr(hub.hub_download, "snapshot", spy)
    hub.data_files("hf:acme/prefs:chat", "test")
    assert asked == [["README.md"], ["chat/test-00000-of-00001.parquet"]]


# -- tfds: sources without data_dir --------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builders.prepare_files({"train": fixture("pairs_chat.jsonl")}, data_dir=data_dir, name="hubtest")
    return data_dir


def test_tfds_name_without_data_dir_uses_the_tfds_default(prepared, monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared))
    source = load_source("tfds:preference_files/hubtest", split="train[:2]", shape="pair")
    assert source.kind == "pair" and len(source) == 2
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"helpsteer2/pairs is not prepared under {tmp_path}; .*"
                                                r"or set data\.data_dir to where it was prepared"):
        load_source("tfds:helpsteer2/pairs")


def test_tfds_source_checks_shape_and_refuses_mappings(prepared):
    spec = "tfds:preference_files/hubtest"
    with pytest.raises(ValueError, match=r"^data\.source='tfds:preference_files/hubtest' holds 'pair' examples, "
                                         r"not 'ranked'$"):
        load_source(spec, data_dir=prepared, shape="ranked")
    with pytest.raises(ValueError, match=r"data\.fields \{'prompt': 'question'\} cannot apply"):
        load_source(spec, data_dir=prepared, fields={"prompt": "question", "chosen": ""})
    with pytest.raises(ValueError, match=r"the row format 'sharegpt' applied when it was prepared"):
        load_source(spec, data_dir=prepared, row_format="sharegpt")
    assert len(load_source(spec, data_dir=prepared, fields={"prompt": ""})) == 3  # empty mappings are no mapping


def test_parse_split():
    assert sources.parse_split("train") == ("train", None)
    assert sources.parse_split("train_prefs[10%:-5]") == ("train_prefs", ("10%", "-5"))
