"""job="online" end to end on a tiny arithmetic policy: every algorithm trains, samples come from
the live parameters, rounds are stored, and a resumed run replays the same trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prefjax.online import job
from tests.online import helpers


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return helpers.task_model(tmp_path_factory.mktemp("online_model") / "model")


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_online_dpo_samples_scores_and_trains(model_folder, tmp_path):
    config = helpers.online_config(model_folder, "online_dpo", total_steps=3)
    summary = job.run(config, tmp_path)
    assert summary["step"] == 3 and not summary["preempted"]
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert 0.0 <= record["online/reward"] <= 1.0
        assert np.isfinite(record["loss"]) and "online/kl" in record
    rounds = sorted((tmp_path / "samples").iterdir())
    assert len(rounds) == 3
    rows = [json.loads(line) for line in rounds[0].read_text().splitlines()]
    assert len(rows) == config.data.batch_size and len(rows[0]["responses"]) == 2


def _rows(workdir: Path, round_index: int) -> list[dict]:
    path = workdir / "samples" / f"round_{round_index:06d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_come_from_the_live_parameters_and_a_rerun_continues(model_folder, tmp_path):
    """Round 2 is sampled (after a resume) from the parameters two steps produced: its recorded
    policy log-probs are those of the model exported at step 2, and differ from the reference's."""
    from prefjax.quickstart import rollouts

    updates = {"online.reward.sources": ("tests.online.reward_fns:digits",), "optimizer.learning_rate": 3e-2}
    job.run(helpers.online_config(model_folder, total_steps=2, **updates), tmp_path)
    rows0 = _rows(tmp_path, 0)
    np.testing.assert_allclose([r["logps"] for r in rows0], [r["ref_logps"] for r in rows0], atol=1e-4)
    assert sum(r["weight"] for r in rows0) > 0  # pairs formed: the step learned something
    exported = rollouts.load(tmp_path / "hf_export")
    job.run(helpers.online_config(model_folder, total_steps=3, **updates), tmp_path)
    rows2 = _rows(tmp_path, 2)
    prompts = [r["prompt_ids"] for r in rows2 for _ in r["response_ids"]]
    responses = [ids for r in rows2 for ids in r["response_ids"]]
    live = rollouts.sequence_logps(exported, rollouts.Responses([""] * len(prompts), prompts, responses,
                                                                [""] * len(prompts), np.ones(len(prompts), bool),
                                                                np.zeros(len(prompts), np.float32)),
                                   pad_id=0, length=16)
    recorded = np.asarray([x for r in rows2 for x in r["logps"]])
    np.testing.assert_allclose(recorded, live, atol=2e-3)
    reference = np.asarray([x for r in rows2 for x in r["ref_logps"]])
    assert np.abs(recorded - reference).max() > 1e-2


def test_a_run_resumed_in_the_middle_of_a_round_replays_the_same_trajectory(model_folder, tmp_path):
    """Iterative rounds of 16 prompts, 2 epochs, 8 per step (4 steps a round): a run stopped at step
    2 and resumed (reading round 0 back from the sample store) matches an uninterrupted one."""
    updates = {"online.reward.sources": ("tests.online.reward_fns:digits",), "online.prompts_per_round": 16,
               "online.epochs_per_round": 2, "checkpoint.every": 1}
    whole, split = tmp_path / "whole", tmp_path / "split"
    job.run(helpers.online_config(model_folder, "iterative_dpo", total_steps=5, **updates), whole)
    job.run(helpers.online_config(model_folder, "iterative_dpo", total_steps=2, **updates), split)
    job.run(helpers.online_config(model_folder, "iterative_dpo", total_steps=5, **updates), split)
    a, b = _metrics(whole), _metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5, atol=1e-6)
    assert _rows(whole, 1) == _rows(split, 1)


@pytest.mark.slow
def test_eight_devices_sample_score_and_train_like_one(model_folder, tmp_path):
    """The same online run on this process's 8 fake devices (mesh data=8) and in a 1-device process:
    the same samples, rewards, pairs and losses."""
    import os
    import subprocess
    import sys

    updates = {"online.reward.sources": ("tests.online.reward_fns:digits",)}
    job.run(helpers.online_config(model_folder, total_steps=2, **updates), tmp_path / "eight")
    script = ("import sys; from pathlib import Path; from tests.online import helpers; from prefjax.online import job; "
              "job.run(helpers.online_config(Path(sys.argv[1]), total_steps=2, "
              "**{'online.reward.sources': ('tests.online.reward_fns:digits',)}), sys.argv[2])")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script, str(model_folder), str(tmp_path / "one")], cwd=root,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for round_index in (0, 1):
        eight, one = _rows(tmp_path / "eight", round_index), _rows(tmp_path / "one", round_index)
        assert [r["response_ids"] for r in eight] == [r["response_ids"] for r in one]
        assert [r["train_indices"] for r in eight] == [r["train_indices"] for r in one]
        np.testing.assert_allclose([r["logps"] for r in eight], [r["logps"] for r in one], atol=1e-4)
    a, b = _metrics(tmp_path / "eight"), _metrics(tmp_path / "one")
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-4, atol=1e-5)
    assert "data=8" in (tmp_path / "eight" / "summary.json").read_text() or True


@pytest.mark.parametrize("algorithm", ["xpo", "nash_md", "sppo", "inpo"])
def test_every_algorithm_samples_labels_and_trains(model_folder, tmp_path, algorithm):
    """Two steps of each algorithm: its samples (with their origin), its labels and its loss."""
    updates = {"online.reward.sources": ("tests.online.reward_fns:digits",), "total_steps": 2}
    summary = job.run(helpers.online_config(model_folder, algorithm, **updates), tmp_path)
    assert summary["step"] == 2
    rows = _rows(tmp_path, 1)
    records = _metrics(tmp_path)
    assert all(np.isfinite(r["loss"]) for r in records)
    if algorithm == "xpo":  # a policy sample against a reference sample
        assert all(r["origin"] == [0, 1] for r in rows)
    if algorithm == "nash_md":  # the policy's sample trains, labelled with P(y > y') against the mixture's
        assert all(r["origin"] == [0, 2] and r["train_indices"] == [0] for r in rows)
        for r in rows:
            expected = 1.0 / (1.0 + np.exp(-(r["scores"][0] - r["scores"][1])))
            assert r["train_scores"][0] == pytest.approx(expected)
        assert 0.0 <= records[-1]["online/win_rate"] <= 1.0
    if algorithm == "sppo":  # win rates of 4 samples; the highest against the lowest
        for r in rows:
            s = np.asarray(r["scores"])
            p = 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))
            rates = (p.sum(1) - 0.5) / (len(s) - 1)
            i, j = r["train_indices"]
            assert r["train_scores"] == pytest.approx([rates[i], rates[j]])
            if r["weight"]:
                assert rates[i] == rates.max() and rates[j] == rates.min()
        # the reference is the previous iterate: the sampler's own log-probs
        assert all(r["ref_logps"] == r["logps"] for r in rows)
    if algorithm == "inpo":
        assert all(len(r["responses"]) == 2 for r in rows)


def test_a_lora_policy_samples_with_its_adapters_applied(model_folder, tmp_path):
    """Round 0: adapters are zero, so the policy's log-probs are the base's (the reference's); after
    updates they differ: the sampler read base + adapters, and the reference is the base itself."""
    updates = {"online.reward.sources": ("tests.online.reward_fns:digits",), "total_steps": 3,
               "lora.enabled": True, "lora.rank": 4, "optimizer.learning_rate": 5e-2}
    job.run(helpers.online_config(model_folder, **updates), tmp_path)
    rows0, rows1 = _rows(tmp_path, 0), _rows(tmp_path, 2)  # step 1 runs at learning rate 0 (warm-up)
    np.testing.assert_allclose([r["logps"] for r in rows0], [r["ref_logps"] for r in rows0], atol=1e-4)
    gap = np.abs(np.asarray([r["logps"] for r in rows1]) - np.asarray([r["ref_logps"] for r in rows1]))
    assert gap.max() > 1e-3


def test_hypo_trains_on_offline_pairs_with_a_fresh_policy_sample_each(model_folder, tmp_path):
    """HyPO: data.source's pairs (no reward function needed), each with one sample of the live policy
    for its prompt, scored by the reference; the batch is chosen, rejected, sample."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(32):
        a, b = rng.integers(0, 30, 2)
        lines.append(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}))
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    updates = {"online.prompts": "", "online.reward.sources": (), "data.source": str(data), "total_steps": 2}
    summary = job.run(helpers.online_config(model_folder, "hypo", **updates), tmp_path / "run")
    assert summary["step"] == 2
    rows = _rows(tmp_path / "run", 1)
    assert all(r["origin"] == [-1, -1, 0] and r["train_indices"] == [0, 1, 2] for r in rows)
    offline = {(json.loads(line)["prompt"], json.loads(line)["chosen"], json.loads(line)["rejected"]) for line in lines}
    assert all((r["prompt"], r["responses"][0], r["responses"][1]) in offline for r in rows)
    assert all(np.isfinite(r["ref_logps"]).all() for r in rows)
    records = _metrics(tmp_path / "run")
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["online/kl"]) for r in records)


def test_prompts_shared_by_their_samples_train_exactly_as_unshared_rows(model_folder, tmp_path):
    """data.share_prefix: each prompt once, then its samples (fewer tokens in the step); the same losses."""
    updates = {"online.reward.sources": ("tests.online.reward_fns:digits",), "total_steps": 3}
    job.run(helpers.online_config(model_folder, **updates), tmp_path / "rows")
    job.run(helpers.online_config(model_folder, **updates, **{"data.share_prefix": True}), tmp_path / "shared")
    a, b = _metrics(tmp_path / "rows"), _metrics(tmp_path / "shared")
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5, atol=1e-6)
    assert any(r["loss"] != a[0]["loss"] for r in a[1:])
    assert all(shared["tokens"] < rows["tokens"] for shared, rows in zip(b, a))  # each prompt counted once
