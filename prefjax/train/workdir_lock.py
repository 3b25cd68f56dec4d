"""One run per workdir: a lock file, `<workdir>/prefjax.lock`, held while a run trains there.

    with WorkdirLock(workdir, heartbeat_seconds=10.0, stale_seconds=120.0) as lock:
        ...            # train; at each checkpoint save:
        lock.check()   # WorkdirLockLostError if another run has taken the workdir over

Two runs in one workdir destroy each other's checkpoints (or the second silently continues
the first with another config), so a second run is refused with `WorkdirBusyError`, a
ConfigError: prefjax.main prints it as one line.

The file holds JSON {pid, host, token, started, heartbeat, argv}. It is created with
O_CREAT|O_EXCL, so of two runs starting together exactly one creates it. A lock left by a
run that died is *stale* and is taken over, so a `kill -9` never blocks the rerun:

- same host and its pid is gone (or is a zombie, or is this very process, which holds no
  such lock: a restarted container that reuses the pid): taken over at once;
- its heartbeat (refreshed every heartbeat_seconds by a daemon thread) is older than
  stale_seconds: its run died on another host, or its pid was reused by another program.

A takeover renames the stale file aside (atomic: of several runs taking over, one renames
it, the others find a different file and start over), then creates the lock with O_EXCL.
A file that does not parse (a run is between creating and writing it) is re-read for
`settle_seconds` and then judged by its modification time.

`run_lock(workdir, settings)` is what the trainer uses: process 0 holds the file and tells
the other processes whether it got it, so that every process of a refused multi-process
run stops with the same error instead of waiting for process 0 in a collective.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from prefjax.train.config_lib import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = "prefjax.lock"
STALE_FILE = LOCK_FILE + ".stale"  # the last lock taken over, kept to show what was there
_ATTEMPTS = 20  # create / judge / take over rounds before giving up (each loses only to another run)
_POLL_SECONDS = 0.05
_JOIN_SECONDS = 5.0  # the heartbeat thread wakes at once when told to stop; never wait longer

# Tokens of the locks this process holds: a lock file naming this pid but another token was
# written by an earlier process that had the same pid (a restarted container), so it is stale.
_HELD_TOKENS: set[str] = set()


class WorkdirLockError(ConfigError):
    """The workdir's lock cannot be taken (an unwritable workdir, settings that cannot work)."""


class WorkdirBusyError(WorkdirLockError):
    """Another live run holds the workdir."""


class WorkdirLockLostError(RuntimeError):
    """This run's lock was taken over (or deleted) while it ran: it must stop writing the workdir."""


class _Seen:
    """A lock file as read once: its parsed record (None when it does not parse) and identity."""

    def __init__(self, record: Optional[dict[str, Any]], stat: os.stat_result):
        self.record = record
        # (device, inode, mtime, size): a heartbeat replaces the file, so any change shows here.
        self.identity = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        self.mtime = stat.st_mtime

    def describe(self, now: float) -> str:
        """'pid 1234 on host h, started ..., last heartbeat 4 s ago' for messages."""
        if self.record is None:
            return f"an unreadable lock file, last written {_age(now, self.mtime)} s ago"
        r = self.record
        heartbeat = _number(r.get("heartbeat"))
        beat = f"last heartbeat {_age(now, heartbeat)} s ago" if heartbeat is not None else "no heartbeat"
        return f"pid {r.get('pid', '?')} on host {r.get('host', '?')}, started {r.get('started', '?')}, {beat}"


class WorkdirLock:
    """The lock on one workdir: acquire() (or `with`), check() while running, release().

    `lost` is None while the lock is held and the reason once it was taken over or deleted.
    """

    def __init__(self, workdir: os.PathLike | str, *, heartbeat_seconds: float = 10.0, stale_seconds: float = 120.0,
                 settle_seconds: float = 2.0):
        if not heartbeat_seconds > 0:
            raise WorkdirLockError(f"workdir_lock.heartbeat_seconds={heartbeat_seconds!r}: must be > 0 (seconds "
                                   "between refreshes of the lock)")
        # A live run refreshes its lock every heartbeat_seconds; a stale limit that close would let
        # a slow refresh (a busy disk, a paused host) look like a dead run.
        if not stale_seconds >= 2 * heartbeat_seconds:
            raise WorkdirLockError(f"workdir_lock.stale_seconds={stale_seconds!r}: must be at least twice "
                                   f"workdir_lock.heartbeat_seconds={heartbeat_seconds!r}, or a live run's lock "
                                   "could be taken for a dead one's")
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.heartbeat_seconds = float(heartbeat_seconds)
        self.stale_seconds = float(stale_seconds)
        self.settle_seconds = float(settle_seconds)
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._record: dict[str, Any] = {}
        self._held = False
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._write_failed = False

    # -- the public protocol ---------------------------------------------------------------

    @property
    def lost(self) -> Optional[str]:
        """None while the lock is held; why it was lost once another run took it over or it was deleted."""
        return self._lost

    def acquire(self) -> WorkdirLock:
        """Creates the lock file, taking over a stale one; WorkdirBusyError if a live run holds it."""
        if self._held:
            raise RuntimeError(f"{self.path} is already held by this WorkdirLock")
        self._lost, self._write_failed, self._stop = None, False, threading.Event()  # a lock may be taken again
        for _ in range(_ATTEMPTS):
            # Registered before the file exists: another thread here must never judge it a dead pid's.
            _HELD_TOKENS.add(self.token)
            try:
                created = self._create()
            except BaseException:
                _HELD_TOKENS.discard(self.token)
                raise
            if created:
                self._held = True
                self._thread = threading.Thread(target=self._beat, daemon=True, name=f"prefjax-lock:{self.path}")
                self._thread.start()
                return self
            _HELD_TOKENS.discard(self.token)
            seen = self._read_settled()
            if seen is None:
                continue  # its owner just released it: try again
            now = time.time()
            reason = self._stale_reason(seen, now)
            if reason is None:
                raise WorkdirBusyError(self._busy_message(seen, now))
            if self._move_aside(seen):
                logger.warning("%s: taking over the lock of a run that is gone (%s): %s; its lock file is kept as %s",
                               self.workdir, seen.describe(now), reason, self.workdir / STALE_FILE)
            # Create again: another run taking over at the same time may win, and is then judged live.
        raise WorkdirBusyError(f"{self.workdir} is in use: its lock {self.path} changed {_ATTEMPTS} times while this "
                               "run tried to take it; several runs are starting there: start only one")

    def check(self) -> None:
        """Raises WorkdirLockLostError if the lock was taken over or deleted since it was acquired."""
        if self._lost is not None:
            raise WorkdirLockLostError(self._lost)

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock file if it is still this run's. Idempotent."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_JOIN_SECONDS)
        _HELD_TOKENS.discard(self.token)
        with contextlib.suppress(OSError):
            os.unlink(self._temp_path())
        if self._lost is not None:
            return  # another run's file now: leave it alone
        try:
            seen = self._read_once()
        except OSError:
            return
        if seen.record is not None and seen.record.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -- acquiring --------------------------------------------------------------------------

    def _create(self) -> bool:
        """O_EXCL-creates the lock file with this run's record; False if it exists."""
        now = time.time()
        self._record = dict(pid=os.getpid(), host=self.host, token=self.token, started=_iso(now), heartbeat=now,
                            argv=list(sys.argv))
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise WorkdirLockError(f"cannot create the lock file {self.path}: {err.strerror}; the workdir must be "
                                   "writable (or set --config.workdir_lock.enabled=False)") from None
        try:
            os.write(fd, _encode(self._record))
            os.fsync(fd)  # a host crash must not leave an empty file, which only its age can judge
        finally:
            os.close(fd)
        return True

    def _read_once(self) -> _Seen:
        """The lock file now (FileNotFoundError if there is none); content and stat of one open file."""
        with open(self.path, "rb") as f:
            stat = os.fstat(f.fileno())
            data = f.read()
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("token"), str):
            record = None
        return _Seen(record, stat)

    def _read_settled(self) -> Optional[_Seen]:
        """The lock file, re-read for up to settle_seconds while it does not parse (being written);
        None if it disappeared."""
        deadline = time.monotonic() + self.settle_seconds
        while True:
            try:
                seen = self._read_once()
            except FileNotFoundError:
                return None
            if seen.record is not None or time.monotonic() >= deadline:
                return seen
            time.sleep(_POLL_SECONDS)

    def _stale_reason(self, seen: _Seen, now: float) -> Optional[str]:
        """Why the lock seen is stale, or None if its run may be alive."""
        record = seen.record
        if record is None:
            age = now - seen.mtime
            if age > self.stale_seconds:
                return f"the file does not parse and was last written {_age(now, seen.mtime)} s ago"
            return None
        pid = record.get("pid")
        if record.get("host") == self.host and isinstance(pid, int):
            if pid == os.getpid() and record.get("token") not in _HELD_TOKENS:
                return f"this process has its pid ({pid}) but never took that lock: its process is gone"
            if not _pid_alive(pid):
                return f"process {pid} no longer exists on this host"
        heartbeat = _number(record.get("heartbeat"))
        if heartbeat is None:
            heartbeat = seen.mtime  # a record without one: the file's last write is its heartbeat
        if now - heartbeat > self.stale_seconds:
            return (f"its heartbeat is {_age(now, heartbeat)} s old (more than "
                    f"workdir_lock.stale_seconds={self.stale_seconds:g})")
        return None

    def _move_aside(self, seen: _Seen) -> bool:
        """Renames the stale file seen out of the way; False if another run got there first (the file
        is then left, or put back, as that run made it)."""
        aside = self.workdir / f"{STALE_FILE}.{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another run moved it first
        try:
            moved = self._identity(aside)
        except OSError:
            return False
        if moved != seen.identity:
            # Between reading and renaming, the file changed: a run that took it over (or the live
            # owner's heartbeat). Put that live lock back unless the path has been taken again.
            try:
                os.link(aside, self.path)
                os.unlink(aside)
            except FileExistsError:
                pass  # a third run created the lock meanwhile; the owner of `aside` will find it lost
            except OSError:
                with contextlib.suppress(OSError):
                    os.rename(aside, self.path)  # a file system without hard links
            return False
        with contextlib.suppress(OSError):
            os.replace(aside, self.workdir / STALE_FILE)
        return True

    @staticmethod
    def _identity(path: Path) -> tuple[int, int, int, int]:
        stat = os.stat(path)
        return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _busy_message(self, seen: _Seen, now: float) -> str:
        lock = self.path
        if seen.record is None:
            return (f"{self.workdir} is in use by another run: its lock {lock} is being written or was left "
                    f"unfinished ({_age(now, seen.mtime)} s ago); wait a few seconds and retry, or, if no run uses "
                    f"this workdir, delete {lock} (it is taken over once it is {self.stale_seconds:g} s old)")
        return (f"{self.workdir} is in use by another run ({seen.describe(now)}): wait for it to finish or use "
                f"another --workdir; if that run is dead on another host, the lock is taken over once its heartbeat "
                f"is {self.stale_seconds:g} s old (or delete {lock})")

    # -- the heartbeat -----------------------------------------------------------------------

    def _temp_path(self) -> Path:
        return self.workdir / f"{LOCK_FILE}.{self.token}.tmp"

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            if not self._refresh():
                return

    def _refresh(self) -> bool:
        """Writes a new heartbeat if the file is still this run's; False (and `lost` set) if not."""
        try:
            seen = self._read_once()
        except FileNotFoundError:
            return self._lose(f"its lock {self.path} was deleted while it ran")
        except OSError as err:
            self._warn_once(err)
            return True
        if seen.record is None:
            return True  # only another run's file can be half-written (ours are replaced whole): look again
        if seen.record.get("token") != self.token:
            return self._lose(f"its lock {self.path} was taken over by another run ({seen.describe(time.time())})")
        self._record["heartbeat"] = time.time()
        try:
            temp = self._temp_path()
            temp.write_bytes(_encode(self._record))
            os.replace(temp, self.path)  # readers see the old file or the new one, never half of one
        except OSError as err:
            self._warn_once(err)
        return True

    def _lose(self, reason: str) -> bool:
        self._lost = (f"{self.workdir}: {reason}; this run stops so that two runs do not write the same "
                      "checkpoints")
        logger.warning("%s", self._lost)
        return False

    def _warn_once(self, err: OSError) -> None:
        # A heartbeat that cannot be written is not fatal by itself: if it stays unwritten for
        # stale_seconds another run may take over, and the next refresh then finds the lock lost.
        if not self._write_failed:
            self._write_failed = True
            logger.warning("%s: cannot refresh the lock's heartbeat (%s); retrying every %g s", self.workdir,
                           err, self.heartbeat_seconds)


@contextlib.contextmanager
def run_lock(workdir: os.PathLike | str, settings: Any, *, process_index: Optional[int] = None,
             process_count: Optional[int] = None,
             broadcast: Optional[Callable[[Any], Any]] = None) -> Iterator[Optional[WorkdirLock]]:
    """The lock a training run holds for its whole length (`settings`: config.workdir_lock).

    Yields the WorkdirLock on process 0 and None elsewhere (or when settings.enabled is False).
    In a multi-process run process 0 broadcasts whether it got the lock, so that a refusal stops
    every process with the same error (the others say to read process 0's log). `process_index`,
    `process_count` and `broadcast` default to jax's (overridable for tests).
    """
    if not settings.enabled:
        yield None
        return
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel -- only when it is needed

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    lock: Optional[WorkdirLock] = None
    failure: Optional[BaseException] = None
    if process_index == 0:
        lock = WorkdirLock(workdir, heartbeat_seconds=settings.heartbeat_seconds,
                           stale_seconds=settings.stale_seconds)
        try:
            lock.acquire()
        except Exception as err:  # noqa: BLE001 -- told to the other processes, then re-raised below
            failure, lock = err, None
    if process_count > 1:
        if broadcast is None:
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

            broadcast = multihost_utils.broadcast_one_to_all
        import numpy as np  # pylint: disable=import-outside-toplevel

        refused = bool(broadcast(np.int32(failure is not None)))
        if refused and process_index != 0:
            raise WorkdirBusyError(f"process 0 could not lock {workdir}: see its log")
    if failure is not None:
        raise failure
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return True
    try:  # Linux: a killed process its parent has not reaped yet is a zombie, and dead
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode()


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _iso(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(now: float, then: Optional[float]) -> int:
    """Whole seconds since `then` (never negative: another host's clock may run ahead)."""
    return max(0, round(now - then)) if then is not None else 0
