"""Runs that meet a fault, end to end through prefjax.train.run and python -m prefjax.main: a
damaged newest checkpoint, a disk that fills up (a file-size limit), a finished run rerun, and
losses that keep producing NaN under on_nonfinite="skip". Each test backs a row of the README's
reliability table; the Checkpointer-level cases (every kind of damaged file) are in
test_checkpoint_integrity.py, the workdir lock in test_workdir_lock.py and dead peers in
tests/test_launch.py."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from prefjax import train
from prefjax.losses import registry, types
from prefjax.train import checkpoint, startup
from tests.train.test_loop import _config, _losses, _run_two_processes

ROOT = Path(__file__).resolve().parents[2]
NAN_LOSS = "always_nan_for_tests"


@pytest.fixture
def nan_loss():
    """A registered loss whose value is NaN on every batch (DPO's, times NaN): what a diverged run sees."""
    dpo = registry.get("dpo")

    @registry.register(NAN_LOSS, inputs=types.PairLogps, requires=dpo.requires, paper="test only", equation="nan")
    def always_nan(lp: types.PairLogps, *, beta: float = 0.1) -> types.LossOutput:
        out = dpo.fn(lp, beta=beta)
        return types.LossOutput(losses=out.losses * jnp.nan, metrics=out.metrics)

    try:
        yield NAN_LOSS
    finally:
        registry.unregister(NAN_LOSS)


# -- NaN policy -------------------------------------------------------------------------------

def test_skip_within_its_limits_finishes_and_counts(tmp_path, nan_loss):
    config = _config(loss_name=nan_loss, on_nonfinite="skip", nonfinite_max_consecutive=100,
                     nonfinite_max_fraction=1.0)
    summary = train.run(config, str(tmp_path))
    assert summary["step"] == 6 and summary["skipped_steps"] == 6 and "error" not in summary


def test_skip_stops_after_too_many_consecutive_skips(tmp_path, nan_loss):
    config = _config(loss_name=nan_loss, on_nonfinite="skip", total_steps=20, nonfinite_max_consecutive=3,
                     nonfinite_max_fraction=0.5)
    with pytest.raises(train.NonFiniteLossError, match=r"3 steps in a row were skipped \(nonfinite_max_consecutive"):
        train.run(config, str(tmp_path))
    summary = json.loads((tmp_path / startup.SUMMARY_FILE).read_text())
    assert summary["skipped_steps"] == 3 and "NonFiniteLossError" in summary["error"]


def test_the_skipped_count_and_its_limit_survive_a_resume(tmp_path, nan_loss):
    # 10 steps with a budget of 2 skipped (0.2 x 10): the third skip stops the run. Checkpoints every
    # step hold the count, so the rerun stops at its first skip (4 > 2) instead of starting over.
    config = _config(loss_name=nan_loss, on_nonfinite="skip", total_steps=10, nonfinite_max_consecutive=100,
                     nonfinite_max_fraction=0.2, **{"checkpoint.every": 1})
    with pytest.raises(train.NonFiniteLossError, match=r"3 of total_steps=10 steps skipped, more than "
                                                        r"nonfinite_max_fraction=0.2 allows \(2\)"):
        train.run(config, str(tmp_path))
    with pytest.raises(train.NonFiniteLossError, match=r"step 4: .* 4 of total_steps=10 steps skipped"):
        train.run(config, str(tmp_path))


def test_stop_names_a_checkpoint_without_nan(tmp_path, nan_loss):
    with pytest.raises(train.NonFiniteLossError, match="No checkpoint was saved yet; set --config.on_nonfinite=skip"):
        train.run(_config(loss_name=nan_loss), str(tmp_path))


# -- finished runs ----------------------------------------------------------------------------

def test_rerunning_a_finished_run_keeps_its_summary(tmp_path, capsys):
    config = _config(total_steps=3)
    first = train.run(config, str(tmp_path))
    written = (tmp_path / startup.SUMMARY_FILE).read_text()
    again = train.run(config, str(tmp_path))
    assert (tmp_path / startup.SUMMARY_FILE).read_text() == written
    assert "already finished at step 3" in capsys.readouterr().out
    assert again["final/loss"] == first["final/loss"]
    # Without summary.json (deleted, or the first run died writing it) the rerun writes it again,
    # with the final metrics its last checkpoint recorded.
    (tmp_path / startup.SUMMARY_FILE).unlink()
    rebuilt = train.run(config, str(tmp_path))
    assert rebuilt["final/loss"] == first["final/loss"] and rebuilt["step"] == 3
    assert json.loads((tmp_path / startup.SUMMARY_FILE).read_text())["final/loss"] == first["final/loss"]


# -- damaged checkpoints ----------------------------------------------------------------------

def _array_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" == p.parent.name)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    config = _config(total_steps=4, **{"checkpoint.every": 2})
    train.run(config, str(tmp_path))
    before = _losses(tmp_path)
    files = _array_files(tmp_path / "checkpoints" / "4")
    assert files, "no array data files found in the step directory"
    for f in files:  # truncate every array data file of the newest checkpoint
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (tmp_path / startup.SUMMARY_FILE).unlink()
    summary = train.run(config, str(tmp_path))
    assert summary["step"] == 4
    moved = {p.name for p in (tmp_path / "checkpoints-damaged" / "4").iterdir()}
    assert {"_CHECKPOINT_METADATA", "integrity", "metadata", "state"} <= moved, moved
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint step 4" in warnings[0] and "checkpoints-damaged/4" in warnings[0]
    # Steps 3-4 were trained again from step 2: the same losses as before the damage.
    after = _losses(tmp_path)
    assert sorted(after) == [1, 2, 3, 4]
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], rel=1e-6)
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2, 4]
    # Every checkpoint damaged: all are moved aside and the run stops with one line (a rerun would
    # start from step 0, since none is left).
    for step in (2, 4):
        for f in _array_files(tmp_path / "checkpoints" / str(step)):
            f.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointDamagedError, match="every checkpoint is damaged"):
        train.run(config, str(tmp_path))
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == []
    assert len(list((tmp_path / "checkpoints-damaged").iterdir())) == 3


# -- a disk that fills up ---------------------------------------------------------------------

def _main_under_file_size_limit(workdir: Path, limit: int, *args: str) -> subprocess.CompletedProcess:
    """python -m prefjax.main with RLIMIT_FSIZE: a write past `limit` bytes fails with EFBIG (SIGXFSZ
    ignored), as on a full disk, without needing a small filesystem."""
    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "prefjax.main", "--config=configs/tiny_dpo.py", f"--workdir={workdir}",
               "--config.checkpoint.export_hf=False", "--config.data.max_len=32", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env,
                          preexec_fn=limit_files)


@pytest.mark.parametrize("every", [2, 100])
def test_a_failed_save_stops_the_run_at_once_and_leaves_a_summary(tmp_path, every):
    # every=2: the background save of step 2 fails and the run stops within a step or two of it (as
    # soon as the write has failed), not at the next save or the end; every=100: only the final save
    # (step 8) is attempted, and it fails.
    result = _main_under_file_size_limit(tmp_path, 64 * 1024, "--config.total_steps=8",
                                         f"--config.checkpoint.every={every}")
    assert result.returncode == 1, result.stderr[-3000:]
    # The run's own report is one line. orbax's threads log the failure too (a line each), and
    # tensorstore may print tracebacks of callbacks into orbax's closed event loop, from its own
    # threads, even in the middle of that line: so the line is searched for, not taken as the last.
    match = re.search(r"error: (saving step \d+ to \S+ failed: \[Errno 27\] File too large)", result.stderr)
    assert match, result.stderr[-3000:]
    error = match.group(1)
    assert "/prefjax/" not in result.stderr, result.stderr[-3000:]  # no traceback of prefjax's own
    summary = json.loads((tmp_path / startup.SUMMARY_FILE).read_text())
    assert "File too large" in summary["error"] and "final/loss" in summary
    if every == 2:
        assert "step 2" in error and 2 <= summary["step"] <= 4, summary["step"]
    else:
        assert "step 8" in error and summary["step"] == 8


@pytest.mark.slow
def test_two_processes_agree_on_the_fallback(tmp_path):
    # Each process reads its own shards: both must see the damage (one allgather), fall back to
    # the same step and train on with the same losses; process 0 moves the step aside.
    common = ["--config.total_steps=4", "--config.checkpoint.every=2", "--config.data.batch_size=4"]
    _run_two_processes(tmp_path, *common)
    before = _losses(tmp_path)
    files = _array_files(tmp_path / "checkpoints" / "4")
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _run_two_processes(tmp_path, *common)
    assert (tmp_path / "checkpoints-damaged" / "4").is_dir()
    after = _losses(tmp_path)
    assert sorted(after) == [1, 2, 3, 4]
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], rel=1e-5)
