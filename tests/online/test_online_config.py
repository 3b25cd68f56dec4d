"""job="online" refuses configs it cannot run before anything is built, in one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from prefjax.online import job
from prefjax.train import config_lib
from tests.online import helpers

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("algorithm, updates, message", [
    ("online_dpo", {"online.algorithm": "ppo"}, r"online.algorithm='ppo' is not one of \["),
    ("xpo", {"loss_name": "dpo"}, r"online.algorithm='xpo' trains with loss_name in \['xpo'\]"),
    ("online_dpo", {"loss_name": "kto"}, r"builds preference pairs; loss 'kto' reads unpaired data"),
    ("online_dpo", {"loss_name": "tdpo1"}, r"loss 'tdpo1' reads \['chosen_mask', 'chosen_token_kl'"),
    ("online_dpo", {"online.reward.sources": ()}, r"online.reward.sources is empty"),
    ("online_dpo", {"online.samples_per_prompt": 1}, r"online.samples_per_prompt=1: online_dpo compares"),
    ("online_dpo", {"online.prompts_per_round": 12}, r"online.prompts_per_round=12 must be 0 .* multiple of "
                                                      r"data.batch_size=8"),
    ("online_dpo", {"reference.kind": "frozen"}, r"reference.kind='frozen': an online run's reference"),
    ("online_dpo", {"reference.refresh": "hard"}, r"reference.refresh does not apply to online runs"),
    ("online_dpo", {"online.reference": "sft"}, r"online.reference='sft'; choose one of"),
    ("online_dpo", {"online.temperature": 0.0}, r"online.temperature=0.0 must be > 0"),
    ("online_dpo", {"online.max_new_tokens": 16}, r"data.max_len=16 leaves no room for a prompt"),
    ("online_dpo", {"online.pairs": "all"}, r"online.pairs='all'; choose one of"),
    ("online_dpo", {"data.pack": True}, r"online batches hold one example per row"),
])
def test_bad_online_settings_are_refused_naming_the_key(algorithm, updates, message):
    config = helpers.online_config(Path("/nonexistent"), algorithm, **updates)
    with pytest.raises(config_lib.ConfigError, match=message):
        job.check(config, num_devices=1)


def test_the_command_line_prints_one_line_for_an_online_mistake(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "prefjax.main", "--config=configs/online.py:xpo", "--config.loss_name=dpo",
         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2 and "online.algorithm='xpo' trains with loss_name in ['xpo']" in lines[-1], result.stderr


def test_the_online_config_file_builds_every_algorithm():
    for name in ("online_dpo", "iterative_dpo", "xpo", "nash_md", "sppo", "inpo"):
        config = helpers.online_config(Path("/nonexistent"), name)
        config_lib.check_keys(config)
        job.check(config, num_devices=1)
        assert config.job == "online" and config.online.algorithm == name


@pytest.mark.parametrize("loss_name, algorithm", [("inpo", "inpo"), ("xpo", "xpo"), ("hypo", "hypo"),
                                                  ("nash_md", "nash_md")])
def test_an_online_loss_on_offline_data_says_to_run_it_online(loss_name, algorithm):
    from prefjax.train import loop, loss_inputs

    config = config_lib.trainer_config()
    config.loss_name = loss_name
    with pytest.raises(config_lib.ConfigError, match=rf"loss '{loss_name}' reads .* run it with job='online' and "
                                                     rf"online.algorithm='{algorithm}'"):
        loop._check_columns(config, loss_inputs.Columns(), num_responses=2)
