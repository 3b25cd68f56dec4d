"""The quick-start reward-model experiment (prefjax.quickstart.reward_model): its statistics against
hand-computed values and brute force, its tables and plot, its command line's errors, and one
shrunken run end to end (slow)."""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from prefjax.quickstart import grid, pipeline
from prefjax.quickstart import reward_model as rm

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILE = ROOT / "configs" / "quickstart_reward_model.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- accuracy


def test_pairwise_accuracy_counts_only_pairs_whose_true_rewards_differ():
    proxy_a = [2.0, 0.0, 1.0, 5.0, 3.0, 0.0]
    proxy_b = [1.0, 1.0, 1.0, 0.0, 3.0, 2.0]
    gold_a = [1.0, 1.0, 0.0, 0.5, 0.0, 0.0]
    gold_b = [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    # pair 0 agrees, 1 disagrees, 2 and 3 tie on the true reward (not counted), 4 ties on the
    # learned reward (one half), 5 agrees (both say b is better).
    assert rm.pairwise_accuracy(proxy_a, proxy_b, gold_a, gold_b) == (pytest.approx(2.5 / 4), 4)


def test_pairwise_accuracy_of_all_tied_pairs_is_nan():
    accuracy, counted = rm.pairwise_accuracy([1.0, 2.0], [0.0, 3.0], [1.0, 0.0], [1.0, 0.0])
    assert math.isnan(accuracy) and counted == 0


def test_pairwise_accuracy_names_mismatched_lengths():
    with pytest.raises(ValueError, match=r"3, 2, 3 and 3 values; each side needs one per pair"):
        rm.pairwise_accuracy([1, 2, 3], [1, 2], [1, 2, 3], [1, 2, 3])


def test_ranking_accuracy_compares_every_pair_within_each_prompt():
    proxy = np.asarray([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    gold = np.asarray([[1.0, 0.0, 0.0], [1.0, 0.0, 0.5]])
    # prompt 0: (0,1) and (0,2) right, (1,2) tied on gold; prompt 1: (0,1), (0,2) wrong, (1,2) right.
    assert rm.ranking_accuracy(proxy, gold) == (pytest.approx(3 / 5), 5)
    with pytest.raises(ValueError, match=r"proxy \(2, 3\), gold \(3, 2\) and keep \(2, 3\) must be the same"):
        rm.ranking_accuracy(proxy, gold.T)


# --------------------------------------------------------------------------- best-of-n


def test_best_of_n_by_hand():
    keys = np.asarray([[0.1, 0.5, 0.3]])
    gold = np.asarray([[1.0, 0.0, 1.0]])
    # n=2: subsets {0,1} and {1,2} pick 1 (gold 0), {0,2} picks 2 (gold 1).
    np.testing.assert_allclose(rm.best_of_n(keys, gold, [1, 2, 3]), [2 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(rm.best_of_n(gold, gold, [1, 2, 3]), [2 / 3, 1.0, 1.0])


def _brute_force(keys: np.ndarray, values: np.ndarray, n: int) -> float:
    """Every n-subset of every prompt's responses; ties on the largest key broken uniformly."""
    per_prompt = []
    for k, v in zip(keys, values):
        picks = []
        for subset in itertools.combinations(range(len(k)), n):
            top = max(k[i] for i in subset)
            picks.append(np.mean([v[i] for i in subset if k[i] == top]))
        per_prompt.append(np.mean(picks))
    return float(np.mean(per_prompt))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_of_n_equals_the_mean_over_all_subsets(seed):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 4, size=(3, 7)).astype(float)  # few distinct values: many ties
    values = rng.normal(size=(3, 7))
    sizes = list(range(1, 8))
    expected = [_brute_force(keys, values, n) for n in sizes]
    np.testing.assert_allclose(rm.best_of_n(keys, values, sizes), expected, rtol=1e-12, atol=1e-12)
    gold = rm.best_of_n(values, values, sizes)
    assert np.all(np.diff(gold) >= -1e-12)  # picking by the value itself never gets worse with n
    assert gold[0] == pytest.approx(values.mean()) and gold[-1] == pytest.approx(values.max(axis=1).mean())


def test_best_of_n_names_its_bad_inputs():
    keys = np.zeros((2, 4))
    with pytest.raises(ValueError, match=r"sizes \[0, 5\] are not in \[1, 4\]"):
        rm.best_of_n(keys, keys, [0, 1, 5])
    with pytest.raises(ValueError, match=r"keys \(2, 4\) and values \(4, 2\) must be the same"):
        rm.best_of_n(keys, keys.T, [1])
    with pytest.raises(ValueError, match="must not be NaN"):
        rm.best_of_n(np.full((1, 2), np.nan), np.zeros((1, 2)), [1])


def test_minus_infinity_marks_responses_never_to_pick():
    keys = np.asarray([[-np.inf, 0.0, 1.0], [-np.inf, -np.inf, 2.0]])
    values = np.asarray([[5.0, 1.0, 0.0], [3.0, 1.0, 2.0]])
    # prompt 0, n=2: {0,1} -> 1, {0,2} -> 0, {1,2} -> 0 (mean 1/3); prompt 1: {0,1} tie at -inf -> 2, else 2.
    np.testing.assert_allclose(rm.best_of_n(keys, values, [2]), [(1 / 3 + (2 + 2 + 2) / 3) / 2])
    keep = np.isfinite(keys)
    # Only prompt 0's pair (1, 2) has both responses kept: gold says 1 > 2, the keys say 2 > 1.
    assert rm.ranking_accuracy(keys, values, keep) == (0.0, 1)


def test_best_of_n_sizes_and_kl_bound():
    assert rm.best_of_n_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert rm.best_of_n_sizes(12) == [1, 2, 4, 8, 12]
    assert rm.kl_bound(1) == 0.0 and rm.kl_bound(8) == pytest.approx(math.log(8) - 7 / 8)


# --------------------------------------------------------------------------- config, tables, plot


def test_the_config_sweeps_label_noise_and_keeps_the_quick_starts_prepared_stages():
    module = grid.load_module(CONFIG_FILE)
    assert grid.expand(module) == [{"tune.label_noise": 0.0}, {"tune.label_noise": 0.2},
                                   {"tune.label_noise": 0.4}]
    quickstart = grid.load_module(ROOT / "configs" / "quickstart.py")
    for arg in (None, "small"):
        config = module.get_config(arg)
        assert config.loss_name == "bradley_terry"
        # Same stages 1-3 as the quick start: --reuse of a quick-start workdir works.
        assert pipeline.prepare_settings(config) == pipeline.prepare_settings(quickstart.get_config(arg))
    with pytest.raises(KeyError, match="may only be 'small', got 'dpo'"):
        module.get_config("dpo")


def test_bad_reward_model_settings_are_named():
    config = grid.load_module(CONFIG_FILE).get_config("small")
    config.reward_model.bon_n = 0
    with pytest.raises(rm.ExperimentError, match=r"^x.py: reward_model.bon_n=0 must be a whole number >= 1$"):
        rm.check_config(config, "x.py")


def _fake_results() -> list[dict]:
    """Two seeds' results with made-up numbers, shaped as run_seed returns them."""
    out = []
    for seed in (0, 1):
        runs = [{"label_noise": eps, "heldout_accuracy": 0.9 - eps + 0.01 * seed,
                 "sample_accuracy": 0.8 - eps, "best_of_n": [0.3, 0.5 - eps, 0.6 - eps]}
                for eps in (0.0, 0.2, 0.4)]
        out.append({"seed": seed, "task": "arithmetic", "bon_sizes": [1, 2, 4], "sft_reward": 0.3,
                    "gold_best_of_n": [0.3, 0.55, 0.75 + 0.1 * seed], "runs": runs})
    return out


def test_tables_and_plot(tmp_path):
    results = _fake_results()
    accuracy = rm.accuracy_table(results, markdown=True)
    # The 20% row: held-out accuracy 0.70 and 0.71 over the two seeds (sd 0.007), best-of-4 0.4.
    assert "| 20% | 0.705 ± 0.007 | 0.600 ± 0.000 | 0.400 ± 0.000 |" in accuracy
    assert "| true reward (upper bound) | 1 | 1 | 0.800 ± 0.071 |" in accuracy
    bon = rm.best_of_n_table(results)
    assert bon.splitlines()[0].split() == ["n", "KL", "bound", "picked", "by", "true", "reward", "by", "RM,",
                                           "0%", "flipped", "by", "RM,", "20%", "flipped", "by", "RM,", "40%",
                                           "flipped"]
    assert bon.splitlines()[-1].split()[:5] == ["4", f"{rm.kl_bound(4):.3f}", "0.800", "±", "0.071"]
    files = rm.write_outputs(results, tmp_path)
    assert files["plot"].read_bytes()[:8] == PNG_MAGIC
    assert json.loads(files["json"].read_text()) == results
    assert "seeds 0, 1" in files["table"].read_text()


# --------------------------------------------------------------------------- command line


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        rm.main([f"--workdir={tmp_path}", "--seeds=0,x"])
    assert stop.value.code == 2
    assert "--seeds='0,x': expected comma-separated integers" in capsys.readouterr().err
    assert rm.main([f"--workdir={tmp_path}", "--seeds=0,1", f"--reuse={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --reuse={tmp_path} holds one seed's SFT model and pairs; give one seed (--seeds=S) with it, "
        "not 2")
    other = tmp_path / "other.py"  # a sweep config without the reward_model section
    quickstart = str(ROOT / "configs" / "quickstart.py")
    other.write_text(f"from prefjax.quickstart import grid\n"
                     f"get_config = grid.load_module({quickstart!r}).get_config\n"
                     "def sweep(add):\n    add(tune__label_noise=0.0)\n")
    assert rm.main([f"--workdir={tmp_path}", f"--config={other}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {other}: the config has no reward_model section (bon_prompts, bon_n, score_batch_size); "
        "start from configs/quickstart_reward_model.py")
    empty = tmp_path / "empty"
    assert rm.main([f"--workdir={tmp_path}", f"--reuse={empty}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: config.reuse='{empty}': no prepared run there ({empty / 'prepare.json'} is missing); run "
        "the quick start there first")
    assert rm.main([f"--workdir={tmp_path}", f"--config={tmp_path / 'missing.py'}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.py'}: no such config file"


# --------------------------------------------------------------------------- end to end

TINY_CONFIG = f"""
from prefjax.quickstart import grid
_experiment = grid.load_module({str(CONFIG_FILE)!r})
sweep = _experiment.sweep


def get_config(arg=None):
    config = _experiment.get_config(arg)  # arg: "small" (--small)
    config.sft.update(steps=60, examples=1000)
    config.west_of_n.update(prompts=128, heldout_prompts=32)
    config.total_steps = 10
    config.reward_model.update(bon_prompts=8, bon_n=8)
    return config
"""


def _experiment(workdir: pathlib.Path, config: pathlib.Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "prefjax.quickstart.reward_model", f"--workdir={workdir}", "--small",
               f"--config={config}"]
    # One CPU device (not conftest's eight): the runs compile and step faster.
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""))
    return subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_the_small_experiment_end_to_end(tmp_path):
    """Stages 1-3, three reward models (0/20/40% flipped) trained, exported, loaded and scored; then a
    rerun reads every run back."""
    config = tmp_path / "tiny.py"
    config.write_text(TINY_CONFIG)
    workdir = tmp_path / "out"
    first = _experiment(workdir, config)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "accuracy: held-out pairs" in first.stdout and "picked by true reward" in first.stdout
    results = json.loads((workdir / "reward_model.json").read_text())
    assert (workdir / "reward_model_bon.png").read_bytes()[:8] == PNG_MAGIC
    assert "| true reward (upper bound) |" in (workdir / "reward_model.md").read_text()

    (seed,) = results
    assert seed["task"] == "sentiment" and seed["bon_sizes"] == [1, 2, 4, 8]
    gold = np.asarray(seed["gold_best_of_n"])
    assert np.all(np.diff(gold) >= -1e-9) and -1.0 <= gold[0] <= gold[-1] <= 1.0
    assert gold[0] == pytest.approx(seed["sft_reward"])
    assert [r["label_noise"] for r in seed["runs"]] == [0.0, 0.2, 0.4]
    for run in seed["runs"]:
        assert 0.0 <= run["heldout_accuracy"] <= 1.0 and 0.0 <= run["sample_accuracy"] <= 1.0
        assert run["heldout_pairs"] > 0 and run["sample_pairs"] > 0
        proxy = np.asarray(run["best_of_n"])
        # n = 1 is a uniform draw whatever picks it; beyond, no pick beats the true reward's.
        assert proxy[0] == pytest.approx(gold[0]) and np.all(proxy <= gold + 1e-9)
        exported = json.loads((pathlib.Path(run["exported"]) / "config.json").read_text())
        assert exported["architectures"][0].endswith("ForSequenceClassification")
    # The flipped training sets: exact fractions of the pairs, the 20% among the 40%.
    original = (workdir / "base" / "pairs" / "train.jsonl").read_text().splitlines()
    flipped = {}
    for eps in (0.2, 0.4):
        rows = (workdir / "runs" / f"tune.label_noise={eps}" / "data" / "train_flipped.jsonl").read_text()
        flipped[eps] = {i for i, (a, b) in enumerate(zip(original, rows.splitlines()))
                        if json.loads(a)["chosen"] != json.loads(b)["chosen"]}
        assert len(flipped[eps]) == int(eps * len(original) + 0.5)
    assert flipped[0.2] < flipped[0.4]

    again = _experiment(workdir, config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(finished, read back)") == 3 and "training:" not in again.stdout
    assert json.loads((workdir / "reward_model.json").read_text()) == results
