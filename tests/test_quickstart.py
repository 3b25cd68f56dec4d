"""The quick-start job end to end: `python -m prefjax.main --config=configs/quickstart.py:small`
runs every stage, each stage's outputs exist and are right, and preference tuning raises the
ground-truth reward on a fixed seed. Also: the command line's errors, and stage reuse."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from prefjax.data import sources
from prefjax.models.tokenizer import load_tokenizer
from prefjax.quickstart import pipeline

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILE = ROOT / "configs" / "quickstart.py"


def _main(*args, workdir, timeout=240):
    command = [sys.executable, "-m", "prefjax.main", *args, f"--workdir={workdir}"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _small_config():
    spec = importlib.util.spec_from_file_location("_quickstart_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("small")


@pytest.fixture(scope="module")
def run(tmp_path_factory):  # ~40 s on 2 CPU cores: the tests using it are marked slow
    """One shrunken run of the whole job through the command line (seed 0)."""
    workdir = tmp_path_factory.mktemp("quickstart")
    result = _main(f"--config={CONFIG_FILE}:small", workdir=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout


@pytest.mark.slow
def test_every_stage_writes_its_outputs(run):
    workdir, _ = run
    for path in ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "prepare.json",
                 "sft/model/config.json", "sft/model/model.safetensors", "sft/model/tokenizer.json",
                 "sft/metrics.jsonl", "pairs/train.jsonl", "pairs/train_unpaired.jsonl",
                 "pairs/heldout.jsonl", "pairs/stats.json", "pairs/best_of_n.json", "tune/metrics.jsonl",
                 "tune/summary.json", "tune/hf_export/model.safetensors", "eval.json", "summary.json"):
        assert (workdir / path).is_file(), path
    for plot in ("training_curves.png", "reward_vs_kl.png"):
        data = (workdir / "plots" / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, plot
    sft_lines = (workdir / "sft/metrics.jsonl").read_text().splitlines()
    sft_losses = [json.loads(line)["loss"] for line in sft_lines]
    assert sft_losses[-1] < sft_losses[0]  # supervised fine-tuning learned something
    load_tokenizer(workdir / "sft" / "model")  # the SFT checkpoint carries the task's tokenizer


@pytest.mark.slow
def test_west_of_n_pairs_are_best_versus_worst_by_the_true_reward(run):
    workdir, _ = run
    task = pipeline.make_task(_small_config())
    pairs = sources.load_source(str(workdir / "pairs" / "train.jsonl"))
    stats = json.loads((workdir / "pairs" / "stats.json").read_text())
    assert len(pairs) == stats["pairs"] > 0 and stats["prompts"] >= len(pairs)
    for example in pairs:
        assert example["kind"] == "pair" and example["format"] == "text"
        prompt = example["prompt"][0]["content"]
        chosen = task.reward(prompt, example["chosen"][0]["content"])
        rejected = task.reward(prompt, example["rejected"][0]["content"])
        # Scores recomputed from the text agree with the file, and the chosen response is better.
        assert (chosen, rejected) == pytest.approx((example["score_chosen"], example["score_rejected"]))
        assert chosen > rejected
    unpaired = sources.load_source(str(workdir / "pairs" / "train_unpaired.jsonl"))
    assert len(unpaired) == 2 * len(pairs)


@pytest.mark.slow
def test_preference_tuning_raises_the_ground_truth_reward(run):
    workdir, _ = run
    summary = json.loads((workdir / "summary.json").read_text())
    sft, tuned = summary["sft"], summary["tuned"]
    assert summary["task"] == "sentiment" and summary["loss_name"] == "dpo" and summary["step"] == 30
    # The reference is its own policy: no KL, no preference among held-out pairs.
    assert sft["kl"] == 0.0 and sft["reward_accuracy"] == 0.5
    # DPO moves the reward up, well beyond the noise of the estimate, at a positive KL.
    gap = tuned["reward"] - sft["reward"]
    assert gap > 0.15 and gap > 3 * (tuned["reward_se"] ** 2 + sft["reward_se"] ** 2) ** 0.5, summary
    assert tuned["kl"] > 0.05 and tuned["win_rate"] > 0.55 and tuned["reward_accuracy"] > 0.6
    # The trainer's own record agrees that it learned the pairs.
    records = [json.loads(line) for line in (workdir / "tune" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 30 and records[-1]["loss"] < 0.69
    assert summary["eval/reward"] == tuned["reward"]
    assert summary["final/loss"] == pytest.approx(records[-1]["loss"])


@pytest.mark.slow
def test_the_summary_table_is_printed(run):
    workdir, stdout = run
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert stage in stdout
    summary = json.loads((workdir / "summary.json").read_text())
    line = next(x for x in stdout.splitlines() if x.startswith("ground-truth reward (mean)"))
    assert line.split()[-2:] == [f"{summary['sft']['reward']:.3f}", f"{summary['tuned']['reward']:.3f}"]


@pytest.mark.slow
def test_prepared_stages_are_reused_only_with_the_same_settings(run):
    workdir, _ = run
    config = _small_config()
    prepared = pipeline.prepare(config, workdir, echo=lambda _: None)  # loads, does not retrain
    assert prepared.sft_folder == workdir / "sft" / "model" and len(prepared.heldout) > 0
    config.sft.steps += 1
    with pytest.raises(ValueError, match=r"prepare.json: .*other settings \(changed: \['sft'\]\)"):
        pipeline.prepare(config, workdir, echo=lambda _: None)


def test_reuse_of_a_missing_run_is_an_error(tmp_path):
    config = _small_config()
    config.reuse = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match="config.reuse=.*no prepared run there"):
        pipeline.prepare(config, tmp_path / "run", echo=lambda _: None)


@pytest.mark.slow
def test_command_line_errors_name_the_problem(tmp_path):
    result = _main(f"--config={CONFIG_FILE}", "--config.sft.stpes=5", workdir=tmp_path, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unknown key sft.stpes (did you mean sft.steps?)" in result.stderr
    result = _main(f"--config={CONFIG_FILE}:nope", workdir=tmp_path, timeout=120)
    assert result.returncode != 0 and "unknown loss 'nope'" in result.stderr


def test_an_unknown_task_names_the_tasks():
    config = _small_config()
    config.task = "chess"
    with pytest.raises(KeyError, match="unknown task 'chess'; tasks are: \\['arithmetic', 'sentiment'\\]"):
        pipeline.make_task(config)
