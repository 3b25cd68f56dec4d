"""The trainer end to end: runs, resumes after SIGKILL with the same trajectory, precomputed
reference = frozen reference, the reference never enters a checkpoint, NaN policies, LoRA and
Hugging Face runs on real data files, config validation, and two processes = one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from prefjax import train
from prefjax.models import hf_checkpoint
from prefjax.train import checkpoint, config_lib
from prefjax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


def _config(**changes):
    c = config_lib.trainer_config()
    c.model.preset = "llama2-tiny"
    c.total_steps = 6
    c.data.batch_size = 8
    c.data.max_len = 32
    c.checkpoint.every = 3
    c.checkpoint.export_hf = False
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 1
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(str(Path(workdir) / "metrics.jsonl")) if "loss" in m}


def test_run_learns_checkpoints_and_exports(tmp_path):
    summary = train.run(_config(**{"checkpoint.export_hf": True, "total_steps": 8}), str(tmp_path))
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 0.3  # synthetic pairs from a small pool are learnable
    assert summary["step"] == 8 and not summary["preempted"]
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [3, 6, 8]
    params = hf_checkpoint.load_params(tmp_path / "hf_export", hf_checkpoint.load_config(tmp_path / "hf_export"))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    for key in ("grad_norm", "learning_rate", "tokens_per_second", "mfu", "step_seconds", "rewards/accuracies"):
        assert key in read_metrics(str(tmp_path / "metrics.jsonl"))[-1]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # Compilation is timed apart (summary and summary.json) and no step is charged or credited with it.
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["compile_seconds"] == summary["compile_seconds"] > 0 and "startup" in written
    rates = [m["tokens_per_second"] for m in read_metrics(str(tmp_path / "metrics.jsonl"))]
    assert rates[0] < 3 * max(rates[1:])


def _main(workdir, *overrides, env=None):
    return [sys.executable, "-m", "prefjax.main", "--config=configs/tiny_dpo.py", f"--workdir={workdir}",
            "--config.total_steps=12", "--config.checkpoint.every=3", "--config.checkpoint.export_hf=False",
            "--config.data.max_len=32", *overrides]


def _env(devices=8):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=1"
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.slow
def test_sigkill_then_rerun_reproduces_the_uninterrupted_trajectory(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_main(straight), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_main(killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = len(metrics.read_text().splitlines())
    assert interrupted_at < 12
    subprocess.run(_main(killed), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=300)
    want, got = _losses(straight), _losses(killed)
    steps = [m["step"] for m in read_metrics(str(metrics))]
    assert steps == list(range(1, 13)), "a step is missing or repeated in metrics.jsonl"
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)], atol=1e-6)


def test_precomputed_reference_equals_the_frozen_one(tmp_path):
    # Held-out evaluation too: the held-out data gets its own cache, computed before training.
    frozen = train.run(_config(**{"data.eval_source": "synthetic"}), str(tmp_path / "frozen"))
    pre = train.run(_config(**{"reference.kind": "precomputed", "data.eval_source": "synthetic"}),
                    str(tmp_path / "pre"))
    np.testing.assert_allclose([_losses(tmp_path / "pre")[s] for s in range(1, 7)],
                               [_losses(tmp_path / "frozen")[s] for s in range(1, 7)], rtol=1e-5)
    assert frozen["step"] == pre["step"] == 6
    evals = sorted(k for k in frozen if k.startswith("eval/"))
    assert "eval/loss" in evals and evals == sorted(k for k in pre if k.startswith("eval/"))
    np.testing.assert_allclose([pre[k] for k in evals], [frozen[k] for k in evals], rtol=1e-4, atol=1e-6)
    cache = sorted((tmp_path / "pre" / "reference_cache").glob("*/part-*.npz"))
    assert len(cache) == 2  # training data and held-out data
    mtimes = [c.stat().st_mtime_ns for c in cache]
    train.run(_config(**{"reference.kind": "precomputed", "total_steps": 6, "data.eval_source": "synthetic"}),
              str(tmp_path / "pre"))
    assert [c.stat().st_mtime_ns for c in cache] == mtimes  # reused, not recomputed


class _HandMadeSource:
    """A batch source written outside prefjax.data: synthetic batches, its position in state()."""

    def __init__(self):
        from prefjax import models
        self.num_responses, self.pad_id, self.data_iterator = 2, 0, None
        self.vocab = models.get_preset("llama2-tiny").vocab_size
        self.position, self.closed = 0, False

    def __iter__(self):
        return self

    def __next__(self):
        from prefjax.data import synthetic_batches
        self.position += 1
        return synthetic_batches.random_batch(8, 2, 32, self.vocab, seed=100 + (self.position - 1) % 3)

    def state(self):
        return {"position": self.position}

    def restore(self, state):
        self.position = state["position"]

    def close(self):
        self.closed = True


def test_the_loop_reads_any_batch_source_and_resumes_its_position(tmp_path):
    from prefjax.train.batch_source import BatchSource

    assert isinstance(_HandMadeSource(), BatchSource)
    train.run(_config(**{"total_steps": 4, "checkpoint.every": 2}), str(tmp_path / "straight"),
              source=_HandMadeSource())
    train.run(_config(**{"total_steps": 2, "checkpoint.every": 2}), str(tmp_path / "resumed"),
              source=_HandMadeSource())
    source = _HandMadeSource()
    train.run(_config(**{"total_steps": 4, "checkpoint.every": 2}), str(tmp_path / "resumed"), source=source)
    want, got = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)], rtol=1e-6)
    assert source.position == 4 and source.closed  # restored to 2, then read steps 3 and 4
    with pytest.raises(config_lib.ConfigError, match="computes its cache from data.source"):
        train.run(_config(**{"reference.kind": "precomputed"}), str(tmp_path / "pre"), source=_HandMadeSource())


def _saved_paths(workdir, step):
    saved = json.loads((Path(workdir) / "checkpoints" / str(step) / "state" / "_METADATA").read_text())
    return {p for p, v in saved["tree_metadata"].items() if v["value_metadata"].get("value_type") != "None"}


def test_reference_is_not_in_the_checkpoint(tmp_path):
    # A run holding a frozen reference in memory saves exactly the arrays of a run that has no
    # reference weights at all (precomputed): the trained params once, Adam's two moments, scalars.
    train.run(_config(**{"total_steps": 3}), str(tmp_path / "frozen"))
    train.run(_config(**{"total_steps": 3, "reference.kind": "precomputed"}), str(tmp_path / "pre"))
    frozen, pre = _saved_paths(tmp_path / "frozen", 3), _saved_paths(tmp_path / "pre", 3)
    assert frozen == pre
    assert not [p for p in frozen if "ref" in p]
    weights = [p for p in frozen if "'embedding')" in p]
    assert len(weights) == 3  # params, mu, nu: no fourth (reference) copy


def test_lora_run_exports_merged_weights_and_adapters(tmp_path):
    summary = train.run(_config(**{"lora.enabled": True, "reference.kind": "lora", "checkpoint.export_hf": True,
                                   "total_steps": 4, "optimizer.learning_rate": 1e-2, "data.synthetic_pool": 1}),
                        str(tmp_path))
    losses = _losses(tmp_path)
    np.testing.assert_allclose(losses[1], np.log(2.0), rtol=1e-5)  # fresh adapters: policy == reference
    assert losses[4] < losses[1]
    assert (tmp_path / "hf_adapters" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "hf_export" / "model.safetensors").is_file() and summary["exported"]


def test_hf_model_on_a_chat_dataset_with_evaluation(tmp_path, caplog):
    data = FIXTURES / "data" / "pairs_chat.jsonl"
    summary = train.run(_config(**{
        "model.hf_folder": str(FIXTURES / "hf" / "qwen2"), "data.source": str(data), "data.eval_source": str(data),
        "data.max_len": 128, "data.buckets": 64, "total_steps": 3, "checkpoint.export_hf": True}), str(tmp_path))
    assert {"eval/loss", "eval/rewards/accuracies"} <= set(summary)
    exported = hf_checkpoint.load(tmp_path / "hf_export")  # tokenizer copied along
    assert exported.tokenizer is not None and exported.cfg.family == "qwen2"
    # max_len 128 is past the fixture's max_position_embeddings=64: said once, as a warning
    assert [r.getMessage()[:68] for r in caplog.records if "max_position_embeddings" in r.getMessage()] == [
        "data.max_len=128 exceeds the model's max_position_embeddings=64 (the"]


@pytest.mark.parametrize("changes, message", [
    ({"loss_name": "dpoo"}, "not a registered loss"),
    ({"loss.bta": 0.1}, "no hyperparameter"),
    ({"reference.kind": "none"}, "needs a reference"),
    ({"mesh.data": 3}, "does not fit 8 devices"),
    ({"mesh.data": 2, "mesh.fsdp": 2}, "4 devices but 8"),
    ({"data.batch_size": 12}, "data-parallel size"),
    ({"grad_accum": 3}, "multiple of grad_accum"),
    ({"lora.enabled": True, "reference.kind": "frozen"}, "reference.kind='lora'"),
    ({"loss_name": "tdpo1", "reference.kind": "precomputed"}, "per token"),
    ({"reference.refresh": "sometimes"}, "reference.refresh"),
    ({"model.preset": "gpt5"}, "not a preset"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"),
    ({"data.pack": True}, "packs real data"),
    ({"data.fill_rows": True}, "set data.pack=True"),
    ({"data.pack": True, "data.source": "pairs.jsonl"}, "needs data.pack_rows"),
    ({"data.pack": True, "data.source": "pairs.jsonl", "data.pack_rows": 4}, "multiple of the data-parallel"),
    ({"data.pack": True, "data.source": "pairs.jsonl", "data.pack_rows": 8, "data.row_length": 16},
     "row_length=16 must be >= data.max_len"),
    ({"data.pack": True, "data.source": "pairs.jsonl", "data.pack_rows": 8, "data.pack_overflow": "skip"},
     "data.pack_overflow"),
    ({"logprob_tile_tokens": 0}, r"logprob_tile_tokens=0 must be a positive number of tokens or None"),
    ({"logprob_chunk": -1}, "logprob_chunk=-1 must be a positive"),
    ({"vocab_chunk": 0}, "vocab_chunk=0"),
])
def test_config_errors_name_the_key_and_the_choices(changes, message):
    config = _config()
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


def test_log_prob_tiling_keys_reach_the_step():
    from prefjax.train import setup
    config = _config()
    config.logprob_chunk, config.vocab_chunk, config.logprob_tile_tokens = 32, 100, 64
    tiling = setup.tiling(config)
    assert (tiling.chunk, tiling.vocab_chunk, tiling.tile_tokens) == (32, 100, 64)
    config.logprob_tile_tokens = None
    config_lib.validate(config)
    assert setup.tiling(config).tile_tokens is None


def test_a_loss_that_needs_scores_refuses_data_without_them(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "data" / "pairs_chat.jsonl").read_text().splitlines()]
    unscored = tmp_path / "unscored.jsonl"
    unscored.write_text("".join(json.dumps(r) + "\n" for r in rows if "score_chosen" not in r))
    config = _config(**{"loss_name": "modpo", "data.source": str(unscored),
                        "model.hf_folder": str(FIXTURES / "hf" / "qwen2"), "data.max_len": 128})
    with pytest.raises(config_lib.ConfigError, match="scores"):
        train.run(config, str(tmp_path))


def _varied_pairs(path, n=48, seed=0):
    """Chat pairs of very different lengths (most short, a few long): what packing is for."""
    rng = np.random.default_rng(seed)
    words = "the small model reads a short sentence and predicts the next word".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            say = " ".join(words[j % len(words)] for j in range(int(min(60, rng.lognormal(1.2, 1.0))) + 1))
            prompt = [{"role": "user", "content": " ".join(words[: 1 + i % 9])}]
            f.write(json.dumps({"chosen": prompt + [{"role": "assistant", "content": say}],
                                "rejected": prompt + [{"role": "assistant", "content": "no " + say}]}) + "\n")
    return path


def test_packed_rows_filled_by_token_budget_train_and_resume(tmp_path):
    # data.pack with data.fill_rows: each step takes the pairs that fit 8 rows of 256 tokens
    # (at most 16). Stopping after 2 steps and rerunning to 4 must give the uninterrupted losses:
    # the data iterator's checkpoint includes the pair that did not fit the last batch.
    data = _varied_pairs(tmp_path / "pairs.jsonl")
    changes = {"model.hf_folder": str(FIXTURES / "hf" / "qwen2"), "data.source": str(data), "data.max_len": 128,
               "data.batch_size": 16, "data.pack": True, "data.pack_rows": 8, "data.row_length": 256,
               "data.fill_rows": True, "checkpoint.every": 2, "total_steps": 4}
    straight = train.run(_config(**changes), str(tmp_path / "straight"))
    train.run(_config(**{**changes, "total_steps": 2}), str(tmp_path / "resumed"))
    resumed = train.run(_config(**changes), str(tmp_path / "resumed"))
    assert straight["step"] == resumed["step"] == 4
    want, got = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(got) == [1, 2, 3, 4] and all(np.isfinite(v) for v in want.values())
    np.testing.assert_allclose([got[k] for k in range(1, 5)], [want[k] for k in range(1, 5)], rtol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir, *overrides):
    """prefjax.main as two jax.distributed processes on 127.0.0.1, one CPU device each."""
    port = _free_port()
    procs = [subprocess.Popen(_main(workdir, *overrides, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                    "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
                              cwd=ROOT, env=_env(devices=1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    common = ["--config.total_steps=4", "--config.data.batch_size=4"]
    one = tmp_path / "one"
    subprocess.run(_main(one, *common), cwd=ROOT, env=_env(devices=2), check=True, capture_output=True, timeout=300)
    two = tmp_path / "two"
    _run_two_processes(two, *common)
    want, got = _losses(one), _losses(two)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-5)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["step"] == 4


@pytest.mark.slow
def test_two_processes_fill_packed_rows_from_their_own_data(tmp_path):
    # Each process packs its own half of the data by token budget: batch counts may differ per
    # process, so the data repeats (num_epochs=None) and total_steps ends the run for both.
    data = _varied_pairs(tmp_path / "pairs.jsonl")
    common = [f"--config.model.hf_folder={FIXTURES / 'hf' / 'qwen2'}", f"--config.data.source={data}",
              "--config.data.max_len=128", "--config.data.batch_size=16", "--config.data.pack=True",
              "--config.data.pack_rows=4", "--config.data.row_length=256", "--config.data.fill_rows=True",
              "--config.total_steps=3", "--config.mesh.data=2"]
    two = tmp_path / "two"
    _run_two_processes(two, *common)
    losses = _losses(two)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())


def test_resume_onto_a_different_mesh(tmp_path):
    train.run(_config(), str(tmp_path))  # data parallel over 8 devices; checkpoints at 3 and 6
    want = _losses(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if the run had stopped after step 3
    train.run(_config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}), str(tmp_path))
    got = _losses(tmp_path)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(4, 7)], [want[s] for s in range(4, 7)], rtol=2e-5)


def test_main_refuses_a_config_without_a_known_job(tmp_path):
    config_file = tmp_path / "no_job.py"
    config_file.write_text("import ml_collections\n\n\ndef get_config():\n"
                           "    return ml_collections.ConfigDict(dict(loss_name='dpo'))\n")
    result = subprocess.run([sys.executable, "-m", "prefjax.main", f"--config={config_file}",
                             f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert str(config_file) in result.stderr and "job=None" in result.stderr and "'train'" in result.stderr
    assert not (tmp_path / "run").exists()
