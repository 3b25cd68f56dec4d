"""Training checkpoints: a thin, documented wrapper over orbax's `CheckpointManager`,
with checksums, fallback to the newest intact step, and failures reported at once.

    ckpt = Checkpointer(workdir / "checkpoints", keep=3, save_every=1000)
    restored = ckpt.restore_latest(abstract_state, data_iterator=it)   # None: start fresh
    for step in ...:
        ...
        ckpt.check_for_errors()       # a failed background save raises here, one step later
        ckpt.save(step, state, data_iterator=it, metadata={"config": config.to_dict()})
    ckpt.close()                      # waits for the last async save

Each step is a directory `<directory>/<step>/` holding up to four orbax items:
`state` (the TrainState pytree, `StandardSave`: one OCDBT/zarr array store, sharded
writes), `metadata` (a JSON dict: config, git sha, ...), `integrity` (JSON: each state
leaf's shape, dtype, checksum and all-finite flag; see prefjax.train.state_digest) and,
when a data iterator is given, `data_iter` (grain's per-process iterator state, written
through grain's orbax handler).

Guarantees (tested in tests/train/test_checkpoint.py and test_checkpoint_integrity.py):

- Keep-N: after a save finishes, only the newest `keep` steps remain on disk.
- Atomic steps: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to
  `<step>` only when every item and every process has finished (on GCS, where rename is
  not atomic, it writes a `commit_success.txt` marker instead). A save interrupted by a
  crash or SIGKILL therefore leaves only a tmp directory, which `latest_step` and
  `restore` never consider. Leftover tmp directories are not swept at start-up, on
  purpose: an evaluator or notebook opening the same directory must never delete the
  trainer's in-flight save. A tmp directory is replaced when that step is saved again.
- Verified restore: `restore_latest` tries the newest step first and checks it: orbax's
  files readable, every item present, the state's recorded checksums equal to the
  restored values' (computed again on device, so any changed byte of any array is
  caught whatever mesh restores it), and every float leaf finite. A step that fails is
  damaged: it is moved (never deleted) to `<directory>-damaged/<step>`, a warning names
  the step, what was wrong and where it went, and the next older step is tried. A step
  whose shapes or structure differ from `abstract_state` while its own records agree is
  a changed config, not damage: `CheckpointMismatchError` names the first differing leaf
  and nothing is moved. Out-of-memory and permission errors are raised, never taken for
  damage. Steps written before checksums existed get only the finiteness check.
- Failures surface at once: a directory that cannot be written fails construction with
  `CheckpointDirectoryError`; a background save that fails makes the next
  `check_for_errors` (cheap: call it every step), `save`, `wait_until_finished` or
  `close` raise `CheckpointSaveError` naming the step, directory and OS reason. Nothing
  waits on orbax's 300 s barriers for a directory that cannot be created: step
  directories are created synchronously, inside `save`.
- Saving a step that is already saved (or being saved) is a no-op returning False, so a
  cadence save and a preemption save at the same step do not collide.
- Restoring a step that does not exist raises `CheckpointNotFoundError` listing the steps
  that do.
- Restore places every array directly into the sharding its abstract leaf carries, which
  may belong to a different mesh, device count or process count than the saving run's.
- Python ints (and floats) in the state round-trip as Python scalars.

Async saves: `save` returns once device buffers are copied to host memory; the write to
disk continues in a background thread, so training proceeds. The next `save`, `restore`,
`wait_until_finished` and `close` wait for it. The data iterator's state, the metadata
and the checksums are captured when `save` is called, not when the write finishes. The
checksums cost one pass over the state on its devices per save and per restore (no file is
read back): ~3 ms for 4 MiB in 4 leaves on one CPU device, ~40 ms for 200 leaves (a small
program per leaf shape, compiled once).

Multi-host: every process calls every method with the same arguments (same steps, same
pytree structure); orbax coordinates the processes through `jax.distributed` barriers
and writes each array shard from the process that owns it. The checksum function is a
collective like the train step, with the same result on every process; what a process finds
reading the files (a shard only it reads may be missing) is agreed on through one
process_allgather per step tried, so every process takes the same fallback decision;
process 0 moves damaged steps aside (tests/train/test_faults.py, two processes). There is
no locking here (prefjax.train.workdir_lock keeps one run per workdir). Scalars in the
state (optax's `count`) must be replicated global arrays, not arrays left on one device
(give `tx.init` explicit out_shardings, as prefjax.train.optim does).

The frozen reference model is never checkpointed: it is rebuilt from the run's init on
resume. Tests can check that with `checkpoint_size_bytes`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import socket
from collections.abc import Callable
from typing import Any, Self

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from prefjax.train import state_digest

logger = logging.getLogger(__name__)


class _FailedSaveNoise(logging.Filter):
    """Shortens what orbax and asyncio log when a background save fails (disk full): orbax logs
    the same exception with its traceback from each of its threads, and asyncio logs each write
    task whose exception orbax left unretrieved when it is garbage-collected (often at exit,
    after prefjax's one-line error). The failure itself is reported once, by CheckpointSaveError
    (the traceback is still there with --verbose, which logs at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" in str(record.msg):
            return "orbax" not in record.getMessage() + repr(record.exc_info)
        if record.exc_info and "orbax" in record.pathname and logging.getLogger().level > logging.DEBUG:
            record.exc_info, record.exc_text = None, None  # its first line says what failed
        return True


logging.getLogger("asyncio").addFilter(_FailedSaveNoise())
logging.getLogger("absl").addFilter(_FailedSaveNoise())


STATE, METADATA, DATA_ITER, INTEGRITY = "state", "metadata", "data_iter", "integrity"
# orbax's per-step record of which items were saved (and their handlers).
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
INTEGRITY_FORMAT = 1


class CheckpointNotFoundError(FileNotFoundError):
    """No finalized checkpoint exists for the requested step."""


class CheckpointDirectoryError(ValueError):
    """The checkpoint directory cannot be created or written."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, file-size limit, storage gone, ...)."""


class CheckpointDamagedError(ValueError):
    """A checkpoint's files are damaged: unreadable, missing, or not what was saved."""


class CheckpointMismatchError(ValueError):
    """An intact checkpoint does not fit the state this run builds (a changed config)."""


# The errors a user (or operator) has to act on: prefjax.main prints them as one line.
USER_ERRORS = (CheckpointDirectoryError, CheckpointSaveError, CheckpointDamagedError, CheckpointMismatchError)


@dataclasses.dataclass
class Restored:
    """What `restore_latest` found: the step, its state and metadata, and a note per damaged
    newer step it moved aside (for the run's start-up report)."""

    step: int
    state: Any
    metadata: dict
    notes: list[str] = dataclasses.field(default_factory=list)


class _Damage(Exception):
    """Internal: this step is damaged; `reason` is the one line the warning shows."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _steps_message(directory: epath.Path, step: int, steps: list[int]) -> str:
    available = ", ".join(str(s) for s in sorted(steps)) if steps else "none"
    return f"{directory}: no finalized checkpoint at step {step}; available steps: {available}"


def _check_json(value: Any, path: str = "metadata") -> None:
    """Raises TypeError naming the first entry that JSON would reject or silently change."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                # json.dumps would turn the key into a string, so it would not round-trip.
                raise TypeError(f"{path}: key {key!r} is a {type(key).__name__}; "
                                "metadata keys must be strings")
            _check_json(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]")
    elif not (value is None or isinstance(value, (str, bool, int, float))):
        raise TypeError(f"{path}: a {type(value).__name__} is not JSON-serialisable (use str, number, "
                        "bool, None, list or dict)")


def _leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves]


def _check_state(state: Any) -> None:
    """Typed PRNG keys have no orbax serialisation: ask for their uint32 key data."""
    for path, leaf in _leaf_paths(state):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(f"state{path} is a typed PRNG key array; checkpoint jax.random.key_data(key) "
                            "and rebuild it with jax.random.wrap_key_data after restore")


def _check_abstract_state(abstract_state: Any) -> None:
    """Without a sharding orbax reuses the saving run's layout, which fails on another mesh."""
    for path, leaf in _leaf_paths(abstract_state):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            raise ValueError(f"abstract_state{path} is a ShapeDtypeStruct without a sharding; give it "
                             "the sharding to restore into (e.g. NamedSharding(mesh, PartitionSpec()) "
                             "for scalars)")


# -- reading failures as one line -----------------------------------------------------------------


def _os_reason(error: BaseException) -> str | None:
    """"[Errno 27] File too large" from an OSError anywhere in the chain, or from tensorstore's
    "[os_error_code='27']" (its write errors arrive as ValueError); None if there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return f"[Errno {error.errno}] {error.strerror or os.strerror(error.errno)}"
        match = re.search(r"os_error_code='?(\d+)", str(error))
        if match:
            code = int(match.group(1))
            return f"[Errno {code}] {os.strerror(code)}"
        error = error.__cause__ or error.__context__
    return None


def _one_line(error: BaseException, limit: int = 400) -> str:
    """The error's first line without tensorstore's spec dump (type name when it has no text),
    at most `limit` characters."""
    text = str(error).strip()
    text = re.split(r"\s*\[tensorstore_spec=|\. See full TensorStore details", text)[0]
    text = text.splitlines()[0] if text else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# tensorstore reports a damaged store as a status code and a message naming the key and file.
_STORE_STATUS = re.compile(r"^(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|INVALID_ARGUMENT|UNKNOWN): ")


def _chain(error: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while error is not None and all(error is not seen for seen in out):
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def _storage_error(error: BaseException) -> str | None:
    """One line for an error that comes from reading damaged files (a tensorstore status, an OS
    error, undecodable JSON or text); None for anything else (a bug, a bad abstract_state)."""
    for link in _chain(error):
        if _STORE_STATUS.match(str(link)):
            return _one_line(link)
    for link in _chain(error):
        if isinstance(link, (OSError, json.JSONDecodeError, UnicodeDecodeError)):
            return _one_line(link)
    return None


def _not_damage(error: BaseException) -> bool:
    """Errors that say nothing about the files: moving the step aside would not help."""
    if isinstance(error, (MemoryError, PermissionError)):
        return True
    text = str(error)
    return any(mark in text for mark in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                         "PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED"))


def _check_writable(directory: epath.Path) -> None:
    """Creates `directory` and writes and removes a probe file in it, so that a read-only or
    misplaced directory fails now with one line instead of inside orbax's background save."""
    try:
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(20, "exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        # Per host and process: every process probes, none removes another's probe.
        probe = directory / f".write-probe-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        reason = _os_reason(e) or _one_line(e)
        raise CheckpointDirectoryError(f"checkpoint directory {directory} cannot be written: {reason}; "
                                       "choose another --workdir or make it writable") from None


def _agreed(reason: str | None) -> str | None:
    """In a multi-process run a step is damaged when any process found it so (a missing shard
    may be seen by one host only): all processes must take the same fallback decision."""
    if jax.process_count() == 1:
        return reason
    flags = multihost_utils.process_allgather(np.array([reason is not None], np.int32))
    if reason is None and int(np.max(flags)) > 0:
        return f"damaged as seen by process {int(np.argmax(np.ravel(flags)))}"
    return reason


class Checkpointer:
    """Saves and restores TrainState pytrees, data-iterator state and run metadata.

    directory: local path or any URL etils.epath understands (gs://...); created if missing,
        and probed for writing (CheckpointDirectoryError if it cannot be written).
    keep: how many of the newest steps to keep on disk (None keeps all).
    save_every: `should_save(step)` is true on multiples of this.
    async_save: write to disk in a background thread (see the module docstring).
    verify: write each state leaf's checksum with every save, and check checksums and
        finiteness on restore.
    """

    def __init__(self, directory: str, *, keep: int | None = 3, save_every: int = 1000,
                 async_save: bool = True, verify: bool = True):
        if keep is not None and keep < 1:
            raise ValueError(f"Checkpointer({directory!r}): keep={keep} must be >= 1 (or None to keep all)")
        if save_every < 1:
            raise ValueError(f"Checkpointer({directory!r}): save_every={save_every} must be >= 1")
        path = epath.Path(directory)
        # orbax wants absolute paths; a relative one would also change meaning with the cwd.
        self.directory = path if "://" in str(directory) else epath.Path(path.resolve())
        self.damaged_directory = epath.Path(f"{self.directory}-damaged")
        self.keep, self.save_every, self.verify = keep, save_every, verify
        _check_writable(self.directory)
        # The save cadence is decided here (should_save), not by orbax's policy, whose default
        # also saves the very first step it sees. Step directories are created in `save`, on this
        # thread: created in the background, a directory that cannot be made leaves orbax's
        # writer threads waiting 300 s for it before the failure is reported.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step of a save not yet known to have finished
        self.notes: list[str] = []  # one line per damaged step moved aside by this Checkpointer

    # -- queries -------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps this manager knows: finalized on disk at start-up, plus its own saves since."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step, or None. Includes a save of this process still in flight."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """True when `step` is a positive multiple of save_every and newer than the latest save.

        `step` counts completed updates, so the untrained initial state (step 0) is not
        saved on cadence. Preemption is not consulted here: PreemptionWatcher owns that
        (jax's preemption sync point must be polled in one place per step).
        """
        latest = self.latest_step()
        return step > 0 and step % self.save_every == 0 and (latest is None or step > latest)

    # -- save ----------------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, data_iterator: Any = None,
             metadata: dict | None = None, force: bool = False) -> bool:
        """Starts saving `state` at `step`; returns whether a save was started.

        Without `force`, saves only when `should_save(step)`. With `force` (preemption, end
        of training), saves any step not yet saved. A step already saved or in flight is a
        no-op (False), never an error. `metadata` is stored as JSON (tuples come back as lists);
        anything JSON cannot hold raises TypeError naming the entry. A failed earlier
        background save, or a write that fails now, raises CheckpointSaveError.
        """
        if isinstance(step, bool) or int(step) != step or step < 0:
            raise ValueError(f"{self.directory}: step must be a non-negative integer, got {step!r}")
        step = int(step)
        self._settle()
        if not force and not self.should_save(step):
            return False
        if step in self._manager.all_steps():
            logger.info("%s: step %d is already saved; skipping", self.directory, step)
            return False
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        _check_json(metadata)
        _check_state(state)
        items = {
            STATE: ocp.args.StandardSave(state),
            # A deep copy through JSON: later mutation of the caller's dict cannot leak into
            # the async write.
            METADATA: ocp.args.JsonSave(json.loads(json.dumps(metadata))),
        }
        if data_iterator is not None:
            # grain's handler is synchronous: the iterator state is read now, before `save`
            # returns, so the trainer may keep iterating.
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iterator)
        if self.verify:
            items[INTEGRITY] = ocp.args.JsonSave(self._integrity_record(step, state, [*items, INTEGRITY]))
        try:
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # pylint: disable=broad-except
            if _os_reason(e) is None:
                raise  # not the storage's doing: a bad state tree, a bug
            raise CheckpointSaveError(self._save_failed(step, e)) from e
        if started:
            self._pending = step
        return started

    def _integrity_record(self, step: int, state: Any, items: list[str]) -> dict[str, Any]:
        """The `integrity` item: what was saved, leaf by leaf (one pass over the state on device)."""
        leaves = state_digest.describe_tree(state)
        nonfinite = [key for key, leaf in leaves.items() if leaf.finite is False]
        if nonfinite:
            names = state_digest.labels(state)
            logger.warning("%s: the state saved at step %d has non-finite values in %s; restore_latest will "
                           "skip this checkpoint", self.directory, step, ", ".join(names[k] for k in nonfinite[:3]))
        return {"format": INTEGRITY_FORMAT, "items": sorted(items),
                "leaves": {key: leaf.to_json() for key, leaf in leaves.items()}}

    def _save_failed(self, step: int, error: BaseException) -> str:
        return f"saving step {step} to {self.directory} failed: {_os_reason(error) or _one_line(error)}"

    def _settle(self) -> None:
        """Waits for the save in flight; CheckpointSaveError (once) if it failed."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
            raise CheckpointSaveError(self._save_failed(step, e)) from e

    def check_for_errors(self) -> None:
        """Raises CheckpointSaveError if a background save has failed; returns at once while a
        save is still being written (one lock-protected flag read: call it every step)."""
        if self._pending is None or self._manager.is_saving_in_progress():
            return
        self._settle()

    # -- restore -------------------------------------------------------------------------------

    def restore_latest(self, abstract_state: Any, *, data_iterator: Any = None,
                       accept: Callable[[int, dict], None] | None = None) -> Restored | None:
        """The newest intact step, restored and verified; None when there is none.

        Tries the newest finalized step first. A damaged step (module docstring) is moved to
        `<directory>-damaged/<step>` with a warning, and the next older one is tried.
        `accept(step, metadata)` is called before a step's arrays are read; whatever it raises
        propagates (it is not damage). CheckpointMismatchError: the newest intact step's
        state does not fit `abstract_state` (nothing is moved). `data_iterator` is restored
        in place. Restored.notes holds a line per step this Checkpointer moved aside.
        """
        self.wait_until_finished()
        _check_abstract_state(abstract_state)
        self._manager.reload()
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, metadata = self._load(step, abstract_state, data_iterator, accept)
            except _Damage as damage:
                self._move_aside(step, damage.reason)
                continue
            return Restored(step, state, metadata, list(self.notes))
        if self.notes:
            logger.warning("%s: EVERY checkpoint is damaged (all moved to %s); there is nothing to resume from",
                           self.directory, self.damaged_directory)
        return None

    def latest_metadata(self) -> tuple[int, dict] | None:
        """(step, metadata) of the newest step whose records read (no arrays are read): what a
        rerun checks before building anything. Steps whose records cannot be read are moved
        aside, as by restore_latest. None when no step is left."""
        self.wait_until_finished()
        self._manager.reload()
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                _, metadata, _ = self._read_records(step)
            except _Damage as damage:
                self._move_aside(step, damage.reason)
                continue
            return step, metadata
        return None

    def restore(self, step: int, abstract_state: Any, *, data_iterator: Any = None) -> tuple[Any, dict]:
        """(state, metadata) of `step`, each array placed in its abstract leaf's sharding.

        abstract_state: the TrainState structure with jax.ShapeDtypeStruct leaves carrying
        `.sharding` (Python scalars may stand for Python scalars). data_iterator: a fresh
        iterator of the same pipeline; its position is restored in place. Checked as in
        restore_latest, but nothing is moved: a damaged step raises CheckpointDamagedError.
        """
        self._require(step)
        _check_abstract_state(abstract_state)
        try:
            return self._load(step, abstract_state, data_iterator, None)
        except _Damage as damage:
            raise CheckpointDamagedError(f"{self._step_dir(step)}: damaged checkpoint: {damage.reason}") from None

    def metadata(self, step: int) -> dict:
        """The metadata dict saved at `step`, read alone (no arrays are restored)."""
        self._require(step)
        try:
            return self._read_records(step)[1]
        except _Damage as damage:
            raise CheckpointDamagedError(f"{self._step_dir(step)}: damaged checkpoint: {damage.reason}") from None

    def _require(self, step: int) -> None:
        self.wait_until_finished()
        if step not in self._manager.all_steps():
            # Another process (an earlier trainer, a copy) may have written it since start-up.
            self._manager.reload()
            if step not in self._manager.all_steps():
                raise CheckpointNotFoundError(_steps_message(self.directory, step, self.all_steps()))

    def _step_dir(self, step: int) -> epath.Path:
        return ocp.path.step.build_step_path(self.directory, ocp.path.step.standard_name_format(), step)

    # -- the checks, in the order restore runs them ----------------------------------------------

    def _load(self, step: int, abstract_state: Any, data_iterator: Any,
              accept: Callable[[int, dict], None] | None) -> tuple[Any, dict]:
        """Reads and checks one step; _Damage names what is wrong with it."""
        items, metadata, integrity = self._read_records(step)
        if accept is not None:
            accept(step, metadata)
        if data_iterator is not None and DATA_ITER not in items:
            raise ValueError(f"{self._step_dir(step)}: a data_iterator was given but this checkpoint has no "
                             f"data-iterator state (items: {sorted(items)})")
        self._check_fit(step, abstract_state, integrity)
        reason = None
        try:
            state = self._restore_item(step, STATE, ocp.args.StandardRestore(abstract_state))
            if data_iterator is not None:
                self._restore_item(step, DATA_ITER, grain.checkpoint.CheckpointRestore(data_iterator))
        except _Damage as damage:
            reason = damage.reason
        if (reason := _agreed(reason)) is not None:
            raise _Damage(reason)
        if self.verify:
            # Computed collectively and identical on every process: no agreement needed.
            problem = _check_values(state, integrity)
            if problem is not None:
                raise _Damage(problem)
        return state, metadata

    def _read_records(self, step: int) -> tuple[set[str], dict, dict | None]:
        """(saved item names, metadata, integrity leaves or None) of `step`, all processes agreeing."""
        reason, result = None, (set(), {}, None)
        try:
            items = self._saved_items(step)
            metadata = self._read_json_item(step, METADATA)
            integrity = self._read_integrity(step) if INTEGRITY in items else None
            result = (items, metadata, integrity)
        except _Damage as damage:
            reason = damage.reason
        if (reason := _agreed(reason)) is not None:
            raise _Damage(reason)
        return result

    def _saved_items(self, step: int) -> set[str]:
        """The items orbax recorded for `step`, each checked to be present."""
        step_dir = self._step_dir(step)
        try:
            record = json.loads((step_dir / STEP_METADATA_FILE).read_text())
        except FileNotFoundError:
            if not any(step_dir.iterdir()):
                raise _Damage("the step directory is empty") from None
            raise _Damage(f"orbax's {STEP_METADATA_FILE} file is missing") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise _Damage(f"orbax's {STEP_METADATA_FILE} file is not valid JSON ({_one_line(e, 80)})") from None
        handlers = record.get("item_handlers") if isinstance(record, dict) else None
        if not isinstance(record, dict):
            raise _Damage(f"orbax's {STEP_METADATA_FILE} file is not a JSON object")
        # Older orbax versions recorded no handlers: then the item directories are the items.
        items = set(handlers) if isinstance(handlers, dict) else {p.name for p in step_dir.iterdir() if p.is_dir()}
        for item in sorted(items | {STATE, METADATA}):
            if not (step_dir / item).is_dir():
                raise _Damage(f"the {item} item is missing")
        return items

    def _read_json_item(self, step: int, item: str) -> dict:
        try:
            value = self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # pylint: disable=broad-except
            if _not_damage(e):
                raise
            raise _Damage(f"the {item} item cannot be read: {_one_line(e)}") from None
        if not isinstance(value, dict):
            raise _Damage(f"the {item} item holds no JSON object" if value is None
                          else f"the {item} item holds a {type(value).__name__}, not a JSON object")
        return dict(value)

    def _read_integrity(self, step: int) -> dict:
        record = self._read_json_item(step, INTEGRITY)
        leaves = record.get("leaves")
        ok = record.get("format") == INTEGRITY_FORMAT and isinstance(leaves, dict) and all(
            isinstance(leaf, dict) and isinstance(leaf.get("shape"), list) and isinstance(leaf.get("digest"), int)
            and isinstance(leaf.get("dtype"), str) for leaf in leaves.values())
        if not ok:
            raise _Damage("the integrity item is garbled")
        return leaves

    def _check_fit(self, step: int, abstract_state: Any, integrity: dict | None) -> None:
        """CheckpointMismatchError when the saved state's structure or shapes differ from
        abstract_state's and the checkpoint's own records agree (a changed config); _Damage
        when orbax's description of the state cannot be read or contradicts the records."""
        step_dir = self._step_dir(step)
        handler = ocp.StandardCheckpointHandler()
        try:
            tree = handler.metadata(step_dir / STATE).tree
            saved = {state_digest.leaf_key(path): tuple(getattr(leaf, "shape", ()) or ())
                     for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
        except Exception as e:  # pylint: disable=broad-except
            if _not_damage(e):
                raise
            raise _Damage(f"the state item's metadata cannot be read: {_one_line(e)}") from None
        finally:
            handler.close()
        labels = state_digest.labels(abstract_state)
        wanted = {key: tuple(getattr(leaf, "shape", ())) for key, leaf in
                  ((state_digest.leaf_key(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0])}
        difference = _first_difference(saved, wanted, "the checkpoint", "this run's state", labels)
        if difference is None:
            return
        if integrity is not None:
            recorded = {key: tuple(leaf["shape"]) for key, leaf in integrity.items()}
            contradiction = _first_difference(recorded, saved, "the integrity record", "state/_METADATA", labels)
            if contradiction is not None:
                raise _Damage(f"the state item's metadata contradicts the integrity record: {contradiction}")
        raise CheckpointMismatchError(
            f"{step_dir}: cannot restore into abstract_state: {difference}. The checkpoint is intact (nothing "
            "was moved): the config that built this state differs from the one that saved it")

    def _restore_item(self, step: int, item: str, args: Any) -> Any:
        """One item read through orbax; _Damage only for errors that come from the files."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
        except Exception as e:  # pylint: disable=broad-except
            reason = None if _not_damage(e) else _storage_error(e)
            if reason is None:
                raise
            raise _Damage(f"the {item} item cannot be read: {reason}") from None

    # -- moving aside ----------------------------------------------------------------------------

    def _move_aside(self, step: int, reason: str) -> None:
        """Moves a damaged step to <directory>-damaged/<step> (process 0 moves, all wait)."""
        # The warning names the directory once: paths inside the reason are shown relative to it.
        reason = reason.replace(f"{self.directory}/", "")
        source = self._step_dir(step)
        target = self.damaged_directory / str(step)
        if target.exists():  # an earlier run's damaged copy of the same step: keep both
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            target = self.damaged_directory / f"{step}-{stamp}"
        if jax.process_index() == 0:
            try:
                self.damaged_directory.mkdir(parents=True, exist_ok=True)
                source.rename(target)
            except OSError as e:
                raise CheckpointDamagedError(
                    f"checkpoint step {step} in {self.directory} is damaged ({reason}), and moving it to "
                    f"{target} failed: {_os_reason(e) or _one_line(e)}; move or delete it by hand") from None
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"prefjax.checkpoint.move_aside.{step}")
        note = f"checkpoint step {step} in {self.directory} is damaged ({reason}); moved it to {target}"
        logger.warning("%s; trying the previous step", note)
        self.notes.append(note)
        self._manager.reload()

    # -- lifecycle -----------------------------------------------------------------------------

    def wait_until_finished(self) -> None:
        """Blocks until any async save has been finalized on disk (CheckpointSaveError if it failed)."""
        self._settle()
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads (CheckpointSaveError if the last
        save failed; the threads are released either way)."""
        try:
            self._settle()
        finally:
            self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _first_difference(left: dict[str, tuple], right: dict[str, tuple], left_name: str, right_name: str,
                      labels: dict[str, str]) -> str | None:
    """The first leaf (in `right`'s order) whose presence or shape differs, as one phrase."""
    for key, shape in right.items():
        label = labels.get(key, key)
        if key not in left:
            return f"{right_name} has {label}, {left_name} does not"
        if tuple(left[key]) != tuple(shape):
            return f"{label} has shape {tuple(left[key])} in {left_name} and {tuple(shape)} in {right_name}"
    for key in left:
        if key not in right:
            return f"{left_name} has {labels.get(key, key)}, {right_name} does not"
    return None


def _check_values(state: Any, integrity: dict | None) -> str | None:
    """What is wrong with restored values: a checksum that differs from the recorded one, or a
    non-finite float leaf; None when neither."""
    computed = state_digest.describe_tree(state)
    labels = state_digest.labels(state)
    recorded = integrity or {}
    for key, got in computed.items():
        want = recorded.get(key)
        if want is None:
            continue
        if tuple(want["shape"]) != got.shape:  # orbax never reshapes: the record is wrong
            return f"the integrity record gives {labels[key]} shape {tuple(want['shape'])}, the restored " \
                   f"array has {got.shape}"
        # A leaf restored into another dtype (orbax casts) cannot be compared bit for bit.
        if want["dtype"] == got.dtype and int(want["digest"]) != got.digest:
            return f"checksum mismatch in {labels[key]}"
    for key, got in computed.items():
        if got.finite is False:
            saved_so = recorded.get(key, {}).get("finite") is False
            return f"non-finite values in {labels[key]}" + (" (already when saved)" if saved_so else "")
    return None



def checkpoint_size_bytes(directory: str, step: int) -> int:
    """Bytes on disk of the finalized checkpoint `<directory>/<step>` (all items, all files).

    Arrays are stored compressed (zstd), so random weights take about their raw size and
    regular ones less. Meant for tests such as "the frozen reference is not in the
    checkpoint": a policy + Adam checkpoint is ~3x the parameter bytes, not ~4x.
    """
    root = epath.Path(directory)
    steps = ocp.path.step.checkpoint_steps(root)
    if step not in steps:
        raise CheckpointNotFoundError(_steps_message(root, step, steps))
    step_dir = ocp.path.step.build_step_path(root, ocp.path.step.standard_name_format(), step)
    total, pending = 0, [step_dir]
    while pending:
        for child in pending.pop().iterdir():
            if child.is_dir():
                pending.append(child)
            else:
                total += child.stat().length
    return total
