"""One run per workdir (prefjax.train.workdir_lock): the lock file's record, a second run refused
with a message naming the holder, stale locks (a killed process on this host, an old heartbeat
from another host, a reused pid) taken over, live ones never, the heartbeat, a takeover noticed
by the run that lost the lock, racing processes of which exactly one wins, and the multi-process
agreement of run_lock."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_collections
import pytest

from prefjax.train import config_lib, workdir_lock
from prefjax.train.workdir_lock import (
    WorkdirBusyError,
    WorkdirLock,
    WorkdirLockError,
    WorkdirLockLostError,
    run_lock,
)
from tests.deadline import run_within

HOST = socket.gethostname()
# Forked helpers only touch files: this module imports jax but runs nothing on it, so no jax thread
# exists to be cut in half by the fork.
FORK = multiprocessing.get_context("fork")


def _record(path: Path) -> dict:
    return json.loads((path / workdir_lock.LOCK_FILE).read_text())


def _write_foreign(workdir: Path, *, pid: int = 4242, host: str = "other-host", heartbeat_age: float = 0.0,
                   token: str = "f" * 32) -> None:
    """A lock file as another run would have written it."""
    now = time.time()
    record = dict(pid=pid, host=host, token=token, started="2026-12-07T14:02:11Z", heartbeat=now - heartbeat_age,
                  argv=["prefjax.main"])
    (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(record))


def _wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_acquire_writes_the_record_and_release_deletes_the_file(tmp_path):
    before = time.time()
    with WorkdirLock(tmp_path) as lock:
        record = _record(tmp_path)
        assert record["pid"] == os.getpid() and record["host"] == HOST and record["token"] == lock.token
        assert record["argv"] == sys.argv
        assert before - 1 <= record["heartbeat"] <= time.time()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["started"])
        assert lock.lost is None
        lock.check()  # held: no error
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp file left either
    lock.release()  # idempotent
    with WorkdirLock(tmp_path):  # free again
        pass


def test_a_second_run_is_refused_with_a_message_naming_the_first(tmp_path):
    with WorkdirLock(tmp_path) as first:
        with pytest.raises(WorkdirBusyError) as info:
            WorkdirLock(tmp_path, stale_seconds=90).acquire()
        message = re.sub(r"heartbeat \d+ s ago", "heartbeat N s ago", str(info.value))  # 0, or 1 on a slow machine
        assert isinstance(info.value, config_lib.ConfigError)  # prefjax.main shows it as one line
        started = _record(tmp_path)["started"]
        assert message == (
            f"{tmp_path} is in use by another run (pid {os.getpid()} on host {HOST}, started {started}, last "
            "heartbeat N s ago): wait for it to finish or use another --workdir; if that run is dead on another "
            f"host, the lock is taken over once its heartbeat is 90 s old (or delete {tmp_path}/prefjax.lock)")
        assert _record(tmp_path)["token"] == first.token  # the refused run left the lock alone
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def _hold_until_killed(workdir: str, tokens) -> None:
    lock = WorkdirLock(workdir).acquire()
    tokens.put(lock.token)
    time.sleep(60)


def test_the_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    tokens = FORK.Queue()
    child = FORK.Process(target=_hold_until_killed, args=(str(tmp_path), tokens))
    child.start()
    try:
        dead_token = tokens.get(timeout=20)
        os.kill(child.pid, signal.SIGKILL)
        # Not reaped yet: the killed process is a zombie, which counts as gone.
        assert _wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z")
        with caplog.at_level(logging.WARNING, logger=workdir_lock.__name__):
            started = time.monotonic()
            lock = WorkdirLock(tmp_path, stale_seconds=3600).acquire()  # the heartbeat is fresh: the pid decides
            assert time.monotonic() - started < 1.0
    finally:
        child.kill()
        child.join(10)
    try:
        assert _record(tmp_path)["token"] == lock.token
        assert json.loads((tmp_path / workdir_lock.STALE_FILE).read_text())["token"] == dead_token
        warning = caplog.text
        assert f"pid {child.pid} on host {HOST}" in warning and f"process {child.pid} no longer exists" in warning
        assert "taking over the lock of a run that is gone" in warning
    finally:
        lock.release()


def test_an_old_heartbeat_on_another_host_is_stale(tmp_path, caplog):
    _write_foreign(tmp_path, heartbeat_age=200)
    with caplog.at_level(logging.WARNING, logger=workdir_lock.__name__):
        with WorkdirLock(tmp_path, stale_seconds=120) as lock:
            assert _record(tmp_path)["token"] == lock.token
    assert "pid 4242 on host other-host" in caplog.text
    assert "its heartbeat is 200 s old (more than workdir_lock.stale_seconds=120)" in caplog.text


def test_an_old_heartbeat_is_stale_even_when_its_pid_lives_again(tmp_path):
    # Same host, a live pid (this test's parent), but no refresh for 200 s: the pid was reused.
    _write_foreign(tmp_path, pid=os.getppid(), host=HOST, heartbeat_age=200)
    with WorkdirLock(tmp_path, stale_seconds=120) as lock:
        assert _record(tmp_path)["token"] == lock.token


def test_a_lock_naming_this_pid_but_not_held_here_is_stale(tmp_path):
    # A restarted container can give the new trainer the pid of the killed one.
    _write_foreign(tmp_path, pid=os.getpid(), host=HOST)
    with WorkdirLock(tmp_path, stale_seconds=3600) as lock:
        assert _record(tmp_path)["token"] == lock.token


def test_a_fresh_lock_on_another_host_is_live(tmp_path):
    _write_foreign(tmp_path, heartbeat_age=5)
    with pytest.raises(WorkdirBusyError, match=r"\(pid 4242 on host other-host, started 2026-12-07T14:02:11Z, last "
                                               r"heartbeat 5 s ago\)"):
        WorkdirLock(tmp_path, stale_seconds=120).acquire()
    assert _record(tmp_path)["pid"] == 4242  # untouched


def test_a_lock_file_being_written_is_read_again_before_it_is_judged(tmp_path):
    path = tmp_path / workdir_lock.LOCK_FILE
    path.write_text("")  # created, not yet written

    def finish_writing() -> None:
        time.sleep(0.3)
        _write_foreign(tmp_path, pid=777, heartbeat_age=1)

    writer = threading.Thread(target=finish_writing)
    writer.start()
    with pytest.raises(WorkdirBusyError, match="pid 777 on host other-host"):
        WorkdirLock(tmp_path, settle_seconds=5.0).acquire()
    writer.join()


def test_an_unfinished_lock_file_is_judged_by_its_age(tmp_path, caplog):
    path = tmp_path / workdir_lock.LOCK_FILE
    path.write_text('{"pid": 12')
    started = time.monotonic()
    with pytest.raises(WorkdirBusyError) as info:
        WorkdirLock(tmp_path, stale_seconds=120, settle_seconds=0.3).acquire()
    assert 0.3 <= time.monotonic() - started < 3
    assert re.sub(r"\(\d s ago\)", "(N s ago)", str(info.value)) == (
        f"{tmp_path} is in use by another run: its lock {path} is being written or was left unfinished (N s ago); "
        f"wait a few seconds and retry, or, if no run uses this workdir, delete {path} (it is taken over once it is "
        "120 s old)")
    old = time.time() - 300
    os.utime(path, (old, old))
    with caplog.at_level(logging.WARNING, logger=workdir_lock.__name__):
        with WorkdirLock(tmp_path, stale_seconds=120, settle_seconds=0.3) as lock:
            assert _record(tmp_path)["token"] == lock.token
    assert "the file does not parse and was last written 300 s ago" in caplog.text


def test_the_heartbeat_is_refreshed_while_the_lock_is_held(tmp_path):
    with WorkdirLock(tmp_path, heartbeat_seconds=0.05, stale_seconds=1.5) as lock:
        first = _record(tmp_path)
        assert _wait_for(lambda: _record(tmp_path)["heartbeat"] > first["heartbeat"] + 0.05, 5)
        later = _record(tmp_path)
        assert later["token"] == lock.token and later["started"] == first["started"]
        # A rival never sees a stale lock while the holder lives, even with a tight stale limit.
        time.sleep(1.7)
        with pytest.raises(WorkdirBusyError):
            WorkdirLock(tmp_path, heartbeat_seconds=0.05, stale_seconds=1.5).acquire()
        assert lock.lost is None
    with lock:  # taken again after its release, it beats again
        first = _record(tmp_path)
        assert _wait_for(lambda: _record(tmp_path)["heartbeat"] > first["heartbeat"] + 0.05, 5)


def test_a_takeover_is_noticed_by_the_run_that_lost_the_lock(tmp_path):
    lock = WorkdirLock(tmp_path, heartbeat_seconds=0.05, stale_seconds=1.0).acquire()
    _write_foreign(tmp_path, pid=999, host="rival")  # another run took it over (as after a long pause)
    assert _wait_for(lambda: lock.lost is not None, 5)
    with pytest.raises(WorkdirLockLostError) as info:
        lock.check()
    assert str(info.value) == lock.lost
    assert str(info.value).startswith(f"{tmp_path}: its lock {tmp_path}/prefjax.lock was taken over by another run "
                                      "(pid 999 on host rival, started 2026-12-07T14:02:11Z, last heartbeat ")
    assert str(info.value).endswith("; this run stops so that two runs do not write the same checkpoints")
    time.sleep(0.2)  # it no longer refreshes the file
    assert _record(tmp_path)["pid"] == 999
    run_within(10, lock.release)
    assert _record(tmp_path)["pid"] == 999  # the new owner's file is left alone


def test_a_deleted_lock_file_is_noticed(tmp_path):
    with WorkdirLock(tmp_path, heartbeat_seconds=0.05, stale_seconds=1.0) as lock:
        (tmp_path / workdir_lock.LOCK_FILE).unlink()
        assert _wait_for(lambda: lock.lost is not None, 5)
        with pytest.raises(WorkdirLockLostError, match="prefjax.lock was deleted while it ran"):
            lock.check()


def _race(workdirs: list[str], barrier, results, worker: int) -> None:
    """Each round: wait for all, try the lock, report, wait until all tried, release."""
    try:
        for workdir in workdirs:
            barrier.wait(30)
            lock = WorkdirLock(workdir, settle_seconds=5.0)
            try:
                lock.acquire()
                results.put((workdir, worker, os.getpid(), "won", ""))
            except WorkdirBusyError as err:
                results.put((workdir, worker, os.getpid(), "busy", str(err)))
            barrier.wait(30)
            lock.release()
    except BaseException as err:  # noqa: BLE001 -- reported to the test instead of dying silently
        results.put(("", worker, os.getpid(), "error", repr(err)))


@pytest.mark.parametrize("stale_at_start", [False, True], ids=["free", "stale"])
def test_of_processes_starting_together_exactly_one_gets_the_lock(tmp_path, stale_at_start):
    workers, rounds = 4, 15
    workdirs = []
    for i in range(rounds):
        workdir = tmp_path / f"round{i}"
        workdir.mkdir()
        if stale_at_start:  # all of them try to take over the same dead run's lock
            _write_foreign(workdir, heartbeat_age=1000)
        workdirs.append(str(workdir))
    barrier, results = FORK.Barrier(workers), FORK.Queue()
    procs = [FORK.Process(target=_race, args=(workdirs, barrier, results, i)) for i in range(workers)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=60) for _ in range(workers * rounds)]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert not [o for o in outcomes if o[3] == "error"]
    for workdir in workdirs:
        here = [o for o in outcomes if o[0] == workdir]
        winners = [o for o in here if o[3] == "won"]
        assert len(winners) == 1, here
        for _, _, _, _, message in here:
            if message:  # the losers name the winner, not the dead run
                assert f"(pid {winners[0][2]} on host {HOST}," in message
        assert not Path(workdir, workdir_lock.LOCK_FILE).exists()  # the winner released it


def test_a_takeover_that_lost_the_race_puts_the_winners_lock_back(tmp_path, monkeypatch):
    # The interleaving the racing test rarely hits: this run judges the dead run's lock stale, then
    # another run takes it over before this one renames it.
    _write_foreign(tmp_path, heartbeat_age=1000)
    winner, late = WorkdirLock(tmp_path), WorkdirLock(tmp_path)
    judge = WorkdirLock._stale_reason

    def judge_then_lose_the_race(self, seen, now):
        reason = judge(self, seen, now)
        if self is late and winner.lost is None and not winner_took_it:
            winner_took_it.append(winner.acquire())
        return reason

    winner_took_it: list = []
    monkeypatch.setattr(WorkdirLock, "_stale_reason", judge_then_lose_the_race)
    with pytest.raises(WorkdirBusyError, match=f"in use by another run \\(pid {os.getpid()} on host"):
        late.acquire()
    try:
        assert winner_took_it and _record(tmp_path)["token"] == winner.token
        assert json.loads((tmp_path / workdir_lock.STALE_FILE).read_text())["pid"] == 4242
        assert sorted(p.name for p in tmp_path.iterdir()) == ["prefjax.lock", "prefjax.lock.stale"]
    finally:
        winner.release()


def test_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(WorkdirLockError, match=r"^workdir_lock.stale_seconds=15: must be at least twice "
                                               r"workdir_lock.heartbeat_seconds=10.0, or a live run's lock"):
        WorkdirLock(tmp_path, heartbeat_seconds=10.0, stale_seconds=15)
    with pytest.raises(WorkdirLockError, match=r"^workdir_lock.heartbeat_seconds=0: must be > 0"):
        WorkdirLock(tmp_path, heartbeat_seconds=0)


def test_a_workdir_where_no_file_can_be_created_is_one_clear_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(WorkdirLockError) as info:
        WorkdirLock(not_a_dir).acquire()
    assert str(info.value) == (f"cannot create the lock file {not_a_dir}/prefjax.lock: Not a directory; the workdir "
                               "must be writable (or set --config.workdir_lock.enabled=False)")


def _settings(enabled: bool = True) -> ml_collections.ConfigDict:
    section = config_lib.trainer_config().workdir_lock
    section.enabled = enabled
    return section


def test_run_lock_holds_the_file_on_process_0_only(tmp_path):
    with run_lock(tmp_path, _settings(), process_index=0, process_count=1) as lock:
        assert _record(tmp_path)["token"] == lock.token
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
    with run_lock(tmp_path, _settings(enabled=False), process_index=0, process_count=1) as lock:
        assert lock is None and not (tmp_path / workdir_lock.LOCK_FILE).exists()
    sent = []
    with run_lock(tmp_path, _settings(), process_index=1, process_count=2,
                  broadcast=lambda flag: sent.append(int(flag)) or 0) as lock:
        assert lock is None and not (tmp_path / workdir_lock.LOCK_FILE).exists()
    assert sent == [0]


def test_run_lock_tells_every_process_of_a_refusal(tmp_path):
    _write_foreign(tmp_path)
    sent = []
    with pytest.raises(WorkdirBusyError, match="is in use by another run \\(pid 4242 on host other-host"):
        with run_lock(tmp_path, _settings(), process_index=0, process_count=2,
                      broadcast=lambda flag: sent.append(int(flag)) or int(flag)):
            pytest.fail("a refused run must not start")
    assert sent == [1]
    with pytest.raises(WorkdirBusyError) as info:
        with run_lock(tmp_path, _settings(), process_index=1, process_count=2, broadcast=lambda flag: 1):
            pytest.fail("a refused run must not start")
    assert str(info.value) == f"process 0 could not lock {tmp_path}: see its log"


# -- the trainer: two launches of one command, and a rerun after kill -9 ------------------------

ROOT = Path(__file__).resolve().parents[2]


def _main(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "prefjax.main", "--config=configs/tiny_dpo.py", f"--workdir={workdir}",
            "--config.total_steps=3", "--config.checkpoint.export_hf=False", "--config.data.max_len=32"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=1"
    env["PYTHONPATH"] = str(ROOT)
    return env


class _Launch:
    """A `python -m prefjax.main` process whose output lines are collected as they come."""

    def __init__(self, workdir: Path):
        self.proc = subprocess.Popen(_main(workdir), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.ended: float | None = None
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is not None and self.ended is None:
            self.ended = time.monotonic()
        return code

    def wait(self, seconds: float) -> int:
        try:
            self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"prefjax.main did not end within {seconds} s:\n{''.join(self.stderr)[-3000:]}")
        self.poll()
        for reader in self._readers:
            reader.join(10)
        return self.proc.returncode


@pytest.mark.slow  # ~20-40 s: two trainer start-ups
def test_two_launches_of_one_command_one_runs_the_other_is_refused_at_once(tmp_path):
    workdir = tmp_path / "run"
    launches = [_Launch(workdir), _Launch(workdir)]
    try:
        assert _wait_for(lambda: any(launch.poll() is not None for launch in launches), 300)
        first_end = time.monotonic()
        codes = [launch.wait(300) for launch in launches]
    finally:
        for launch in launches:
            if launch.proc.poll() is None:
                launch.proc.kill()
    assert sorted(codes) == [0, 1], [''.join(launch.stderr)[-2000:] for launch in launches]
    winner, loser = launches if codes[0] == 0 else launches[::-1]
    # The refused one stopped while the other was still training, with one line and no traceback.
    assert loser.ended <= first_end < winner.ended
    assert "Traceback" not in "".join(loser.stderr)
    assert [line for line in loser.stderr if line.startswith("error:")] == loser.stderr[-1:], loser.stderr
    assert loser.stderr[-1].startswith(f"error: {workdir} is in use by another run (pid {winner.proc.pid} on host "
                                      f"{HOST}, started ")
    assert "wait for it to finish or use another --workdir" in loser.stderr[-1]
    assert json.loads((workdir / "summary.json").read_text())["step"] == 3
    assert not (workdir / workdir_lock.LOCK_FILE).exists()


@pytest.mark.slow  # ~20-40 s: two trainer start-ups
def test_a_run_killed_with_sigkill_is_rerun_without_cleanup(tmp_path):
    workdir = tmp_path / "run"
    killed = _Launch(workdir)
    try:
        started = _wait_for(lambda: any(line.startswith("  steps: fresh run") for line in killed.stdout)
                            or killed.poll() is not None, 300)
        assert started and killed.poll() is None, "the run ended before it could be killed"
        killed.proc.send_signal(signal.SIGKILL)
    finally:
        killed.wait(60)
    assert _record(workdir)["pid"] == killed.proc.pid  # the kill left its lock behind
    rerun = _Launch(workdir)
    assert rerun.wait(300) == 0, ''.join(rerun.stderr)[-3000:]
    log = "".join(rerun.stderr)
    assert f"taking over the lock of a run that is gone (pid {killed.proc.pid} on host {HOST}" in log
    assert f"process {killed.proc.pid} no longer exists on this host" in log
    assert json.loads((workdir / "summary.json").read_text())["step"] == 3
    assert not (workdir / workdir_lock.LOCK_FILE).exists()


_TWO_PROCESS_WORKER = """
import sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                           initialization_timeout=60)
from prefjax.train import config_lib, workdir_lock
settings = config_lib.trainer_config().workdir_lock
with workdir_lock.run_lock(sys.argv[3], settings) as lock:
    print("free:", "held" if lock is not None else "none", flush=True)
try:
    with workdir_lock.run_lock(sys.argv[4], settings):
        print("busy: not refused", flush=True)
except workdir_lock.WorkdirBusyError as err:
    print("busy: refused:", err, flush=True)
"""


def test_in_a_two_process_run_both_processes_learn_of_a_refusal(tmp_path):
    free, busy = tmp_path / "free", tmp_path / "busy"
    free.mkdir()
    busy.mkdir()
    _write_foreign(busy)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_WORKER, f"127.0.0.1:{port}", str(i), str(free),
                               str(busy)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) for i in range(2)]
    try:
        # (gloo prints its connection lines to stdout too)
        # (gloo prints its connection lines to stdout too; the heartbeat's age depends on start-up time)
        outputs = [[re.sub(r"heartbeat \d+ s ago", "heartbeat N s ago", line)
                    for line in p.communicate(timeout=120)[0].splitlines() if line.startswith(("free:", "busy:"))]
                   for p in procs]
    finally:
        for p in procs:
            p.kill()
    refusal = (f"busy: refused: {busy} is in use by another run (pid 4242 on host other-host, started "
               "2026-12-07T14:02:11Z, last heartbeat N s ago): wait for it to finish or use another --workdir; if "
               "that run is dead on another host, the lock is taken over once its heartbeat is 120 s old (or delete "
               f"{busy}/prefjax.lock)")
    assert outputs[0] == ["free: held", refusal]
    assert outputs[1] == ["free: none", f"busy: refused: process 0 could not lock {busy}: see its log"]
