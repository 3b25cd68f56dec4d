"""The offline-vs-online experiment (prefjax.quickstart.online): every method's reward calls equal
the offline budget (checked through the online package's own round arithmetic), its errors, its
table and plot, and one shrunken run end to end (slow)."""

from __future__ import annotations

import json
import math
import pathlib
import types

import pytest

from prefjax.online import job
from prefjax.online import source as source_lib
from prefjax.online import store as store_lib
from prefjax.quickstart import grid, online, tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILE = ROOT / "configs" / "quickstart_online.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(arg=None):
    return grid.load_module(CONFIG_FILE).get_config(arg)


def _fake_prepared(config) -> types.SimpleNamespace:
    """What online_config reads of pipeline.Prepared: the task and the SFT folder."""
    return types.SimpleNamespace(task=tasks.get_task(config.task), sft_folder=pathlib.Path("/nonexistent/sft"))


# --------------------------------------------------------------------------- the budget


@pytest.mark.parametrize("arg", [None, "small"])
def test_every_method_spends_exactly_the_offline_budget(arg):
    """The trainer configs' own round arithmetic (prefjax.online.source) gives the budget: rounds run x
    prompts a round x samples a prompt = west_of_n.prompts x west_of_n.n, for every online method."""
    config = _config(arg)
    budget = config.west_of_n.prompts * config.west_of_n.n
    assert online.offline_budget(config) == budget
    assert online.plan(config, online.OFFLINE)["reward_calls"] == budget
    for method in config.online_experiment.methods:
        if method == online.OFFLINE:
            continue
        c = online.online_config(config, _fake_prepared(config), method)
        job.check(c, num_devices=1)
        assert c.online.algorithm == method
        rounds, partial = divmod(c.total_steps, source_lib.steps_per_round(c))
        assert partial == 0, method  # no round sampled and left half-trained
        calls = rounds * source_lib.round_prompts(c) * source_lib.samples_per_prompt(c)
        assert calls == budget, method
        assert online.plan(config, method)["reward_calls"] == calls
        assert c.online.store.keep_rounds >= rounds  # every round stays countable
    iterative = online.online_config(config, _fake_prepared(config), "iterative_dpo")
    assert iterative.total_steps // source_lib.steps_per_round(iterative) == config.online_experiment.iterative_rounds


def test_a_budget_that_does_not_split_is_an_error_naming_the_keys():
    config = _config()
    config.west_of_n.prompts = 2048  # 16,384 calls: not 3 equal rounds
    with pytest.raises(online.ExperimentError,
                       match=r"16384 does not split into online_experiment.iterative_rounds=3 rounds .* make "
                             r"west_of_n.prompts a multiple of 192"):
        online.plan(config, "iterative_dpo")
    config.west_of_n.prompts = 2112
    config.online_experiment.batch_size = 5
    with pytest.raises(online.ExperimentError,
                       match=r"16896 is not a whole number of online_dpo steps of online_experiment.batch_size=5 "
                             r"prompts x 2 samples"):
        online.plan(config, "online_dpo")


def test_check_config_names_the_section_and_the_methods():
    config = _config("small")
    config.online_experiment.methods = ("online_dpo", "ppo")
    with pytest.raises(online.ExperimentError, match=r"online_experiment.methods: 'ppo' is not one of"):
        online.check_config(config, "cfg.py")
    config.online_experiment.methods = ()
    with pytest.raises(online.ExperimentError, match=r"cfg.py: online_experiment.methods is empty"):
        online.check_config(config, "cfg.py")
    del config["online_experiment"]
    with pytest.raises(online.ExperimentError, match=r"cfg.py: the config has no online_experiment section"):
        online.check_config(config, "cfg.py")


def test_reward_calls_are_counted_from_every_round_in_the_store(tmp_path):
    store = store_lib.SampleStore(tmp_path / "samples", keep_rounds=0)
    for r, k in enumerate((2, 2, 3)):
        store.write_round(r, [{"prompt": "1+1=", "responses": ["2"] * k, "scores": [1.0] * k}] * 4)
    assert online.count_reward_calls(tmp_path) == 4 * (2 + 2 + 3)
    assert online.count_reward_calls(tmp_path / "empty") == 0


# --------------------------------------------------------------------------- outputs


def _fake_results(seeds=(0, 1)):
    out = []
    for seed in seeds:
        runs = [{"method": m, "seed": seed, "reward_calls": 96,
                 "eval": {"reward": 0.3 + 0.1 * i + 0.01 * seed, "kl": 0.5 * i, "win_rate": 0.5 + 0.05 * i},
                 "seconds": {"train": 10.0 * (i + 1), "labels": 2.0 if m == online.OFFLINE else 0.0}}
                for i, m in enumerate(("offline_dpo", "online_dpo", "nash_md"))]
        out.append({"seed": seed, "task": "arithmetic", "budget": 96, "sft": {"reward": 0.29 + 0.01 * seed},
                    "best_of_n": [{"n": n, "kl": math.log(n) - (n - 1) / n, "reward": 0.3 + 0.1 * n} for n in (1, 2, 4)],
                    "runs": runs})
    return out


def test_outputs_hold_one_row_per_method_with_mean_and_spread(tmp_path):
    results = _fake_results()
    files = online.write_outputs(results, tmp_path)
    assert files["plot"].read_bytes()[:8] == PNG_MAGIC
    assert json.loads(files["json"].read_text()) == results
    md = files["table"].read_text()
    assert "seeds 0, 1" in md and "96 reward calls" in md
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in lines[1:]] == [
        "SFT (start of every method)", "offline DPO (West-of-N)", "online DPO", "Nash-MD"]
    # online DPO: rewards 0.40 and 0.41, KL 0.5 both, 20 s of training each
    assert "| online DPO | 0.405 ± 0.007 | 0.50 ± 0.00 | 0.550 ± 0.000 | 96 ± 0 | 20 ± 0 |" in md
    assert "| offline DPO (West-of-N) | 0.305 ± 0.007 | 0.00 ± 0.00 | 0.500 ± 0.000 | 96 ± 0 | 12 ± 0 |" in md


def test_command_line_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla"))  # leaves jax's cache setting alone
    assert online.main([f"--workdir={tmp_path}", "--seeds=0,1", "--reuse=/somewhere"]) == 2
    err = capsys.readouterr().err
    expected = ("error: --reuse=/somewhere holds one seed's SFT model and pairs; give one seed (--seeds=S) with "
                "it, not 2")
    assert err.strip().splitlines() == [expected]
    assert online.main([f"--workdir={tmp_path}", "--reuse=/nonexistent/qs"]) == 2
    assert "no prepared run there" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end


# The small experiment runs end to end (every method, trained, evaluated, tabled and plotted) in
# colabs/online_dpo.ipynb, which tests/test_notebooks.py executes headless.
