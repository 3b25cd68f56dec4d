"""prefjax.models.hub and prefjax.hub_download: Hub model ids resolved offline from a fake
huggingface_hub cache (revision pinning, the files asked for, errors, one download per host)
and a trainer run whose model.hf_folder and data.source are Hub ids."""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from huggingface_hub.utils import LocalEntryNotFoundError, filter_repo_objects

from prefjax import hub_download, train
from prefjax.models import hf_checkpoint, hub
from prefjax.train import config_lib, reference_cache
from tests.hub_helpers import FakeHubCache, folder_files

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
QWEN = FIXTURES / "hf" / "qwen2"
LLAMA = FIXTURES / "hf" / "llama"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fake cache holding acme/tiny: main = qwen2 (+ a decoy pytorch_model.bin), tag v1 = llama."""
    fake = FakeHubCache(tmp_path / "hub", monkeypatch)
    fake.v1 = fake.add("model", "acme/tiny", folder_files(LLAMA), refs=("v1",))
    fake.main = fake.add("model", "acme/tiny", {**folder_files(QWEN), "pytorch_model.bin": b"not read"})
    monkeypatch.setattr(hub, "_resolved", {})  # results are remembered per process: start empty
    return fake


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_hub_id_resolves_to_the_cached_snapshot_and_loads(cache):
    resolved = hub.resolve("acme/tiny")
    assert Path(resolved.folder) == cache.storage("model", "acme/tiny") / "snapshots" / cache.main
    assert (resolved.repo_id, resolved.revision, resolved.commit) == ("acme/tiny", "main", cache.main)
    assert resolved.identity == f"acme/tiny@{cache.main}"
    loaded, direct = hf_checkpoint.load(resolved.folder), hf_checkpoint.load(QWEN)
    assert loaded.cfg.family == "qwen2" and loaded.tokenizer is not None
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(loaded.params), _leaves(direct.params)))


@pytest.mark.parametrize("revision", ["v1", "sha"])
def test_revision_pinning_by_ref_name_and_by_commit(cache, revision):
    name = f"acme/tiny@{cache.v1 if revision == 'sha' else revision}"
    resolved = hub.resolve(name)
    assert resolved.commit == cache.v1 and resolved.identity == f"acme/tiny@{cache.v1}"
    assert hf_checkpoint.load_config(resolved.folder).family == "llama"
    assert hub.resolve("acme/tiny").commit == cache.main  # no revision: main


def test_an_existing_local_folder_wins_over_a_hub_id(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = Path("acme") / "tiny"
    local.mkdir(parents=True)
    resolved = hub.resolve("acme/tiny")
    assert resolved.folder == str(local) and resolved.repo_id is None and resolved.identity == str(local)


def test_only_config_safetensors_and_tokenizer_files_are_requested(monkeypatch, tmp_path):
    FakeHubCache(tmp_path / "hub", monkeypatch)
    monkeypatch.setattr(hub, "_resolved", {})
    asked = []

    def fake_download(repo_id, **kwargs):
        asked.append(kwargs)
        return str(tmp_path / "snapshots" / ("a" * 40))

    monkeypatch.setattr(hub_download.huggingface_hub, "snapshot_download", fake_download)
    hub.resolve("acme/tiny")
    hub.resolve("acme/tiny", key="data.tokenizer", weights=False)
    model, tokenizer = asked[0]["allow_patterns"], asked[1]["allow_patterns"]
    assert asked[0]["repo_type"] == "model" and asked[0]["local_files_only"]
    repo = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
            "model-00001-of-00002.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja", "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt",
            "flax_model.msgpack", "tf_model.h5", "tokenizer.model", "original/consolidated.00.pth",
            "onnx/model.onnx", "README.md", ".gitattributes"]
    # What huggingface_hub itself would fetch with these patterns:
    assert sorted(filter_repo_objects(repo, allow_patterns=model)) == sorted(repo[:9])
    assert sorted(filter_repo_objects(repo, allow_patterns=tokenizer)) == sorted(
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja"])
    for decoy in ("pytorch_model.bin", "model.pt", "flax_model.msgpack", "tf_model.h5"):
        assert not any(fnmatch.fnmatch(decoy, p) for p in model + tokenizer)


def test_missing_in_cache_while_offline_says_what_to_do(cache):
    with pytest.raises(hub.HubError) as err:
        hub.resolve("acme/absent")
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.hf_folder='acme/absent' (not a local folder): ")
    assert "not in the Hugging Face cache" in message and str(cache.root) in message
    assert "hf download acme/absent" in message and "unset HF_HUB_OFFLINE" in message
    with pytest.raises(hub.HubError, match=r"acme/tiny@v2 is not in the Hugging Face cache.*--revision v2"):
        hub.resolve("acme/tiny@v2", key="data.tokenizer")


@pytest.mark.parametrize("name", ["./checkpoints/sft", "a/b/c", "just-a-name", "acme/tiny@", "bad id/x y"])
def test_neither_a_folder_nor_an_id(cache, name):
    with pytest.raises(hub.HubError, match=r"^model\.hf_folder=.*: no such folder, and not a Hub model id "
                                           r"'owner/name' or 'owner/name@revision'$"):
        hub.resolve(name)


def test_a_file_is_not_a_model_folder(cache, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(hub.HubError, match="is a file; give the folder holding config.json"):
        hub.resolve(str(path))


def test_one_download_per_host_the_others_read_the_cache(monkeypatch, tmp_path, caplog):
    """Four racing threads: one asks the Hub (online), the three that waited on the lock read the
    cache offline; while waiting they log."""
    FakeHubCache(tmp_path / "hub", monkeypatch, offline=False)
    monkeypatch.setattr(hub_download.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_download, "WAIT_LOG_SECONDS", 0.05)
    folder = str(tmp_path / "snapshots" / ("b" * 40))
    calls = {"online": 0, "offline": 0}
    done = threading.Event()

    def fake_download(repo_id, *, local_files_only, **kwargs):
        if local_files_only:
            calls["offline"] += 1
            if not done.is_set():
                raise LocalEntryNotFoundError("not cached")
            return folder
        calls["online"] += 1
        time.sleep(0.4)  # a download: the others start waiting meanwhile
        done.set()
        return folder

    monkeypatch.setattr(hub_download.huggingface_hub, "snapshot_download", fake_download)
    start, results = threading.Barrier(4), []

    def worker():
        start.wait()
        results.append(hub_download.snapshot("acme/tiny", revision=None, repo_type="model",
                                             allow_patterns=["config.json"], what="test"))

    with caplog.at_level(logging.WARNING, logger=hub_download.__name__):
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
    assert results == [folder] * 4
    assert calls == {"online": 1, "offline": 3}
    assert any("waiting" in r.getMessage() and "acme/tiny" in r.getMessage() for r in caplog.records)
    # Later, a fresh request asks the Hub again (a branch may have moved).
    hub_download.snapshot("acme/tiny", revision=None, repo_type="model", allow_patterns=["config.json"], what="test")
    assert calls["online"] == 2


def test_fingerprint_uses_the_commit_not_the_branch_name(cache):
    def fingerprint(name):
        c = config_lib.trainer_config()
        c.model.hf_folder = name
        return reference_cache.fingerprint(c)

    assert fingerprint("acme/tiny") == fingerprint(f"acme/tiny@{cache.main}")
    assert fingerprint("acme/tiny@v1") == fingerprint(f"acme/tiny@{cache.v1}") != fingerprint("acme/tiny")


@pytest.mark.slow  # one small trainer run (~20-60 s on 2 shared CPU cores)
def test_trainer_runs_from_a_hub_model_id_on_a_hub_dataset(cache, tmp_path):
    data = FIXTURES / "data" / "pairs_chat.jsonl"
    cache.add("dataset", "acme/prefs", {"data/train-00000-of-00001.jsonl": data, "data/test-00000-of-00001.jsonl": data})
    c = config_lib.trainer_config()
    c.model.hf_folder = "acme/tiny"
    c.data.source = c.data.eval_source = "hf:acme/prefs"
    c.total_steps, c.data.batch_size, c.data.max_len, c.eval_batches = 2, 8, 128, 1
    c.checkpoint.every, c.checkpoint.export_hf = 2, True
    summary = train.run(c, str(tmp_path / "run"))
    assert summary["step"] == 2 and np.isfinite(summary["final/loss"]) and "eval/loss" in summary
    exported = hf_checkpoint.load(tmp_path / "run" / "hf_export")  # tokenizer copied from the snapshot
    assert exported.cfg.family == "qwen2" and exported.tokenizer is not None
