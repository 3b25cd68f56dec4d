"""Runs that never hang and never go silent: the start-up report, compile time kept out of step
metrics, resume checks (config diff, the learning-rate schedule, kept configs, no replayed
steps), and degenerate data that stops a run at once with the reason."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from prefjax import train
from prefjax.data import sources
from prefjax.data.pipeline import PipelineEmptyError
from prefjax.train import config_lib, resume
from prefjax.train.loop import DataExhaustedError
from prefjax.train.metrics import read_metrics
from tests.deadline import run_within
from tests.train.test_loop import FIXTURES, _config, _losses

QWEN = str(FIXTURES / "hf" / "qwen2")
PAIRS = FIXTURES / "data" / "pairs_chat.jsonl"  # 3 chat pairs
# seconds: each failing case below stops before any compilation. Runs that train cannot be
# guarded so (train.run installs signal handlers, which only the main thread may).
DEADLINE = 120


def _summary(workdir):
    return json.loads((Path(workdir) / "summary.json").read_text())


def _cosine(count, total, peak, warmup=1):
    """optim.make_schedule's cosine, written out: linear warmup from 0, then decay to 0."""
    if count < warmup:
        return peak * count / warmup
    t = min(max((count - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def test_report_compile_time_and_resume_rules(tmp_path, capsys):
    workdir = tmp_path / "run"
    train.run(_config(**{"total_steps": 2, "checkpoint.every": 2}), str(workdir))
    out = capsys.readouterr().out
    # The start-up block, printed once, and the compile time on its own line.
    assert "prefjax train: dpo on 8 cpu device(s)" in out
    assert f"steps: fresh run, to step 2; workdir {workdir}" in out
    assert "data: synthetic (pair examples, format auto): random tokens, rows of 32" in out
    assert "compiled train step in " in out
    summary = _summary(workdir)
    startup = summary["startup"]
    assert startup["model"]["parameters"] == startup["model"]["trainable"] > 0
    assert startup["devices"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert startup["loss"]["hparams"] == {"beta": 0.1, "label_smoothing": 0.0}
    assert startup["reference"]["kind"] == "frozen"
    assert 0.0 < startup["data"]["first_batch"]["padding_waste"] < 1.0
    assert summary["compile_seconds"] > 0 and summary["compiled_programs"] == 1
    # Step 1's time starts after compilation and ends when its metrics arrive: its rate is a
    # step's rate, not the dispatch time of step 2 (MFU in the thousands of percent before).
    records = {r["step"]: r for r in read_metrics(str(workdir / "metrics.jsonl"))}
    assert records[1]["step_seconds"] > 0
    assert records[1]["tokens_per_second"] < 3 * records[2]["tokens_per_second"]
    assert records[1]["mfu"] < 3 * records[2]["mfu"]
    first_config = (workdir / "config.json").read_text()

    # Another beta: refused before anything is built, naming only the key that differs.
    with pytest.raises(resume.ConfigChangedError) as err:
        run_within(DEADLINE, train.run, _config(**{"total_steps": 2, "checkpoint.every": 2, "loss.beta": 0.2,
                                                   "log_every": 5, "mesh.data": 4, "mesh.fsdp": 2}), str(workdir))
    message = str(err.value)
    assert "(step 2) was trained with another config: loss.beta: 0.1 -> 0.2. Rerun" in message
    assert "allow_config_change=True" in message and "log_every" not in message and "mesh" not in message
    assert (workdir / "config.json").read_text() == first_config  # a refused rerun overwrites nothing

    # total_steps 2 -> 4: the steps taken (counts 0, 1: warmup 0, then the peak) have the same
    # rates under the 4-step plan, so the run resumes, and says so.
    train.run(_config(**{"total_steps": 4, "checkpoint.every": 2}), str(workdir))
    out = capsys.readouterr().out
    assert "steps: resumed from step 2, to step 4" in out
    assert "note: total_steps 2 -> 4: the 2 steps taken had the same learning rates" in out
    assert [r["step"] for r in read_metrics(str(workdir / "metrics.jsonl")) if "loss" in r] == [1, 2, 3, 4]

    # total_steps 4 -> 8 at step 4 would jump: the 4-step cosine is over (rate 0 at count 4), the
    # 8-step one is at 3/7 of its decay.
    peak = 3e-3
    before, after = _cosine(4, 4, peak), _cosine(4, 8, peak)
    with pytest.raises(resume.ConfigChangedError) as err:
        run_within(DEADLINE, train.run, _config(**{"total_steps": 8, "checkpoint.every": 2}), str(workdir))
    assert (f"was trained with total_steps=4; total_steps=8 would make the cosine schedule jump at step 4 from "
            f"learning rate {before:.4g} to {after:.4g}") in str(err.value)

    # Every start that passed the check kept its config: the fresh run's and the resume at 2.
    kept = sorted(p.name for p in (workdir / "configs").iterdir())
    assert [name.split("-")[1] for name in kept] == ["0", "2"]

    # Allowed: the schedule is re-planned over 8 steps from step 4 on, and the run says so.
    train.run(_config(**{"total_steps": 8, "checkpoint.every": 2, "checkpoint.allow_config_change": True}),
              str(workdir))
    out = capsys.readouterr().out
    assert f"jumps at step 4 from {before:.4g} (old plan) to {after:.4g}" in out
    rates = {r["step"]: r["learning_rate"] for r in read_metrics(str(workdir / "metrics.jsonl"))
             if "learning_rate" in r}
    np.testing.assert_allclose(rates[5], after, rtol=1e-5)  # step 5's update uses count 4
    assert sorted(rates) == list(range(1, 9))
    assert len(list((workdir / "configs").glob("config-4-*.json"))) == 1


def test_a_rerun_drops_the_steps_it_redoes_from_the_metrics(tmp_path):
    # As if killed after logging step 4 but before its checkpoint: the rerun resumes at 3 and
    # logs step 4 once, from its own computation (the killed run's record is dropped).
    workdir = tmp_path / "run"
    train.run(_config(**{"total_steps": 4, "checkpoint.every": 3}), str(workdir))
    shutil.rmtree(workdir / "checkpoints" / "4")
    records = read_metrics(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    records[-1]["loss"] = 123.0
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    train.run(_config(**{"total_steps": 4, "checkpoint.every": 3}), str(workdir))
    losses = _losses(workdir)
    assert [r["step"] for r in read_metrics(str(workdir / "metrics.jsonl"))] == [1, 2, 3, 4]
    assert losses[4] != 123.0 and np.isfinite(losses[4])


def _hf(**changes):
    return _config(**{"model.hf_folder": QWEN, "data.max_len": 128, **changes})


def test_data_that_drops_every_example_stops_at_once_with_the_reason(tmp_path):
    config = _hf(**{"data.source": str(PAIRS), "data.max_len": 16, "data.response_mode": "drop"})
    with pytest.raises(PipelineEmptyError) as err:
        run_within(DEADLINE, train.run, config, str(tmp_path / "dropped"))
    message = str(err.value)
    assert message.startswith(f"data.source={str(PAIRS)!r}: no example survives preprocessing: all 3 examples "
                              "of one pass over the data were dropped: 3 with prompt + response over max_len=16")
    assert err.value.counts == {"sequence_too_long": 3}
    # The start-up report was not reached, but the config was kept.
    assert (tmp_path / "dropped" / "config.json").is_file()


def test_an_empty_data_file_stops_at_once(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PipelineEmptyError, match=rf"data.source={str(empty)!r}: the data source holds no examples "
                                                 r"\(0 rows read, 0 examples\); nothing to train on"):
        run_within(DEADLINE, train.run, _hf(**{"data.source": str(empty)}), str(tmp_path / "run"))


def test_empty_held_out_data_stops_at_start_up_naming_data_eval_source(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PipelineEmptyError, match=rf"^data.eval_source={str(empty)!r}: the data source holds no "
                                                 r"examples \(0 rows read, 0 examples\)"):
        run_within(DEADLINE, train.run, _hf(**{"data.source": str(PAIRS), "data.eval_source": str(empty)}),
                   str(tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_data_read_once_ends_the_run_with_a_message_and_a_small_eval_set_evaluates(tmp_path, capsys):
    # 3 pairs, batches of 8, read once: one step's worth of data. The held-out set (the same 3
    # pairs, fewer than a batch) evaluates after step 1; step 2 has no data left.
    config = _hf(**{"data.source": str(PAIRS), "data.eval_source": str(PAIRS), "data.num_epochs": 1,
                    "eval_every": 1, "total_steps": 3})
    with pytest.raises(DataExhaustedError, match=rf"data.source={str(PAIRS)!r} has no batch left for step 2 "
                                                       r"of total_steps=3 \(1 batch for data.num_epochs=1\): set "
                                                       r"data.num_epochs=None to repeat the data, or total_steps=1"):
        train.run(config, str(tmp_path / "run"))  # trains, so in the main thread (signal handlers)
    out = capsys.readouterr().out
    # the row format the loader detected, when it says (records.LoadSummary.row_format)
    detected = getattr(sources.load_source(str(PAIRS)).summary, "row_format", None)
    assert (f"data: {PAIRS} (pair examples, format auto{f' -> {detected}' if detected else ''}): 3 examples "
            "from 3 rows") in out
    assert "lengths (tokens, first 3 examples): prompt p50" in out
    evals = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [1] and np.isfinite(evals[0]["eval/loss"])
    sample = _summary(tmp_path / "run")["startup"]["data"]["sample"]  # written at start, kept after the crash
    assert sample["examples"] == 3 and sample["dropped"] == {} and sample["sequence_tokens"]["max"] <= 128


# --------------------------------------------------------------------------- config diff rules

def _json(config):
    return json.loads(config.to_json_best_effort())


def test_run_only_keys_do_not_count_and_others_do():
    old = _json(_config())
    changed = _config(**{"log_every": 7, "eval_every": 3, "checkpoint.every": 9, "checkpoint.keep": 1,
                         "mesh.data": 2, "mesh.fsdp": 4, "peak_flops": 1e12, "logprob_chunk": 64})
    assert resume.config_diff(old, changed) == {}
    changed = _config(**{"optimizer.learning_rate": 1e-4, "data.max_len": 48})
    assert resume.config_diff(old, changed) == {"data.max_len": (32, 48), "optimizer.learning_rate": (3e-3, 1e-4)}


def test_nan_equals_nan_and_a_key_an_older_config_lacks_counts_as_its_default():
    old = _json(_config(**{"loss.beta": float("nan")}))
    del old["data"]["format"]  # a checkpoint from before data.format existed
    assert resume.config_diff(old, _config(**{"loss.beta": float("nan")})) == {}
    assert resume.config_diff(old, _config(**{"loss.beta": float("nan"), "data.format": "trl"})) == {
        "data.format": ("auto", "trl")}


def test_allow_config_change_resumes_and_lists_the_changes():
    old = _json(_config())
    notes = resume.check_config(old, _config(**{"loss.beta": 0.3, "checkpoint.allow_config_change": True}), 3)
    assert notes == ["config changed on resume (checkpoint.allow_config_change=True): loss.beta: 0.1 -> 0.3"]


def test_total_steps_with_a_constant_schedule_changes_nothing_taken():
    old = _json(_config(**{"optimizer.schedule": "constant", "optimizer.warmup_steps": 2}))
    notes = resume.check_config(old, _config(**{"optimizer.schedule": "constant", "optimizer.warmup_steps": 2,
                                                "total_steps": 50}), 5)
    assert notes == [("total_steps 6 -> 50: the 5 steps taken had the same learning rates under the new plan; "
                     "the constant schedule continues over 50 steps")]
    # A warmup given as a fraction of total_steps moves with it: refused.
    old = _json(_config(**{"optimizer.schedule": "constant", "optimizer.warmup_steps": 0.5}))
    with pytest.raises(resume.ConfigChangedError, match="total_steps=6; total_steps=50 would make the constant "
                                                        "schedule jump at step 2"):
        resume.check_config(old, _config(**{"optimizer.schedule": "constant", "optimizer.warmup_steps": 0.5,
                                            "total_steps": 50}), 2)


def test_config_error_classes():
    assert issubclass(resume.ConfigChangedError, config_lib.ConfigError)
    assert issubclass(DataExhaustedError, config_lib.ConfigError)


def test_every_difference_is_listed_at_once():
    old = _json(_config())
    with pytest.raises(resume.ConfigChangedError, match=r"ckpt \(step 3\) was trained with another config: "
                                                        r"loss.beta: 0.1 -> 0.2; total_steps: 6 -> 9\. Rerun"):
        resume.check_config(old, _config(**{"loss.beta": 0.2, "total_steps": 9}), 3, where="ckpt")
