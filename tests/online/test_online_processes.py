"""job="online" as two jax.distributed processes on 127.0.0.1 equals one process: every process
samples and scores the same round from the global policy, and trains on its own slice of it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.online import helpers

ROOT = Path(__file__).resolve().parents[2]


def _command(workdir: Path, folder: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prefjax.main", "--config=configs/online.py:online_dpo,test", f"--workdir={workdir}",
            f"--config.model.hf_folder={folder}", "--config.online.reward.sources=('tests.online.reward_fns:digits',)",
            "--config.total_steps=3", "--config.checkpoint.export_hf=False", *extra]


def _env(devices: int) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": str(ROOT)}


def _losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_sample_and_train_like_one(tmp_path):
    folder = helpers.task_model(tmp_path / "model")
    one = tmp_path / "one"
    subprocess.run(_command(one, folder), cwd=ROOT, env=_env(2), check=True, capture_output=True, timeout=300)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    procs = [subprocess.Popen(_command(two, folder, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
                              cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    for round_index in range(3):
        name = f"round_{round_index:06d}.jsonl"
        a = [json.loads(line) for line in (one / "samples" / name).read_text().splitlines()]
        b = [json.loads(line) for line in (two / "samples" / name).read_text().splitlines()]
        assert [r["response_ids"] for r in a] == [r["response_ids"] for r in b]
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_round_then_rerun_replays_the_trajectory(tmp_path):
    """Iterative rounds of 4 steps, a checkpoint every step: a run killed (SIGKILL) during round 0 or
    1 and rerun gives every step once, with the losses of a run never interrupted."""
    import signal
    import time

    from prefjax.online import job

    folder = helpers.task_model(tmp_path / "model")
    updates = {"online.reward.sources": ("tests.online.reward_fns:digits",), "online.prompts_per_round": 16,
               "online.epochs_per_round": 2, "checkpoint.every": 1, "total_steps": 6,
               "checkpoint.export_hf": False}
    job.run(helpers.online_config(folder, "iterative_dpo", **updates), tmp_path / "straight")
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "prefjax.main", "--config=configs/online.py:iterative_dpo,test",
               f"--workdir={killed}", f"--config.model.hf_folder={folder}",
               "--config.online.reward.sources=('tests.online.reward_fns:digits',)",
               "--config.online.prompts_per_round=16", "--config.online.epochs_per_round=2",
               "--config.checkpoint.every=1", "--config.total_steps=6", "--config.checkpoint.export_hf=False"]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) < 6
    subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True,
                   timeout=300)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6], "a step is missing or repeated in metrics.jsonl"
    np.testing.assert_allclose(_losses(killed), _losses(tmp_path / "straight"), rtol=1e-5, atol=1e-6)
