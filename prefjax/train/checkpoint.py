"""Training checkpoints: a thin, documented wrapper over orbax's `CheckpointManager`.

    ckpt = Checkpointer(workdir / "checkpoints", keep=3, save_every=1000)
    if (step := ckpt.latest_step()) is not None:
        state, meta = ckpt.restore(step, abstract_state, data_iterator=it)
    for step in ...:
        ...
        ckpt.save(step, state, data_iterator=it, metadata={"config": config.to_dict()})
    ckpt.close()                      # waits for the last async save

Each step is a directory `<directory>/<step>/` holding three orbax items:
`state` (the TrainState pytree, `StandardSave`: one OCDBT/zarr array store, sharded
writes), `metadata` (a JSON dict: config, git sha, ...) and, when a data iterator is
given, `data_iter` (grain's per-process iterator state, written through grain's orbax
handler).

Guarantees (tested in tests/test_checkpoint.py):

- Keep-N: after a save finishes, only the newest `keep` steps remain on disk.
- Atomic steps: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to
  `<step>` only when every item and every process has finished (on GCS, where rename is
  not atomic, it writes a `commit_success.txt` marker instead). A save interrupted by a
  crash or SIGKILL therefore leaves only a tmp directory, which `latest_step` and
  `restore` never consider. Leftover tmp directories are not swept at start-up, on
  purpose: an evaluator or notebook opening the same directory must never delete the
  trainer's in-flight save. A tmp directory is replaced when that step is saved again.
- Saving a step that is already saved (or being saved) is a no-op returning False, so a
  cadence save and a preemption save at the same step do not collide.
- Restoring a step that does not exist raises `CheckpointNotFoundError` listing the steps
  that do.
- Restore places every array directly into the sharding its abstract leaf carries, which
  may belong to a different mesh, device count or process count than the saving run's.
- Python ints (and floats) in the state round-trip as Python scalars.

Async saves: `save` returns once device buffers are copied to host memory; the write to
disk continues in a background thread, so training proceeds. The next `save`, `restore`,
`wait_until_finished` and `close` wait for it. The data iterator's state and the metadata
are captured when `save` is called, not when the write finishes.

Multi-host: every process calls every method with the same arguments (same steps, same
pytree structure); orbax coordinates the processes through `jax.distributed` barriers
and writes each array shard from the process that owns it. There is no locking here.
Scalars in the state (optax's `count`) must be replicated global arrays, not arrays left
on one device (give `tx.init` explicit out_shardings, as prefjax.train.optim does).

The frozen reference model is never checkpointed: it is rebuilt from the run's init on
resume. Tests can check that with `checkpoint_size_bytes`.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Self

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

logger = logging.getLogger(__name__)

STATE, METADATA, DATA_ITER = "state", "metadata", "data_iter"


class CheckpointNotFoundError(FileNotFoundError):
    """No finalized checkpoint exists for the requested step."""


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


class Checkpointer:
    """Saves and restores TrainState pytrees, data-iterator state and run metadata.

    directory: local path or any URL etils.epath understands (gs://...); created if missing.
    keep: how many of the newest steps to keep on disk (None keeps all).
    save_every: `should_save(step)` is true on multiples of this.
    async_save: write to disk in a background thread (see the module docstring).
    """

    def __init__(self, directory: str, *, keep: int | None = 3, save_every: int = 1000,
                 async_save: bool = True):
        if keep is not None and keep < 1:
            raise ValueError(f"Checkpointer({directory!r}): keep={keep} must be >= 1 (or None to keep all)")
        if save_every < 1:
            raise ValueError(f"Checkpointer({directory!r}): save_every={save_every} must be >= 1")
        path = epath.Path(directory)
        # orbax wants absolute paths; a relative one would also change meaning with the cwd.
        self.directory = path if "://" in str(directory) else epath.Path(path.resolve())
        self.keep, self.save_every = keep, save_every
        # The save cadence is decided here (should_save), not by orbax's policy, whose default
        # also saves the very first step it sees.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

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
        anything JSON cannot hold raises TypeError naming the entry.
        """
        if isinstance(step, bool) or int(step) != step or step < 0:
            raise ValueError(f"{self.directory}: step must be a non-negative integer, got {step!r}")
        step = int(step)
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
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    # -- restore -------------------------------------------------------------------------------

    def restore(self, step: int, abstract_state: Any, *, data_iterator: Any = None) -> tuple[Any, dict]:
        """(state, metadata) of `step`, each array placed in its abstract leaf's sharding.

        abstract_state: the TrainState structure with jax.ShapeDtypeStruct leaves carrying
        `.sharding` (Python scalars may stand for Python scalars). data_iterator: a fresh
        iterator of the same pipeline; its position is restored in place.
        """
        self._manager.wait_until_finished()
        if step not in self._manager.all_steps():
            # Another process (an earlier trainer, a copy) may have written it since start-up.
            self._manager.reload()
            if step not in self._manager.all_steps():
                raise CheckpointNotFoundError(_steps_message(self.directory, step, self.all_steps()))
        _check_abstract_state(abstract_state)
        step_dir = ocp.path.step.build_step_path(self.directory, ocp.path.step.standard_name_format(), step)
        items = {STATE: ocp.args.StandardRestore(abstract_state), METADATA: ocp.args.JsonRestore()}
        if data_iterator is not None:
            if not (step_dir / DATA_ITER).exists():
                raise ValueError(f"{step_dir}: a data_iterator was given but this checkpoint has no "
                                 f"data-iterator state (items: {sorted(p.name for p in step_dir.iterdir())})")
            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:
            raise ValueError(f"{step_dir}: cannot restore into abstract_state: {e}") from e
        return restored[STATE], dict(restored[METADATA] or {})

    def metadata(self, step: int) -> dict:
        """The metadata dict saved at `step`, read alone (no arrays are restored): what a rerun
        checks before building anything (e.g. the config the checkpoint was trained with)."""
        self._manager.wait_until_finished()
        if step not in self._manager.all_steps():
            self._manager.reload()
            if step not in self._manager.all_steps():
                raise CheckpointNotFoundError(_steps_message(self.directory, step, self.all_steps()))
        restored = self._manager.restore(step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))
        return dict(restored[METADATA] or {})

    # -- lifecycle -----------------------------------------------------------------------------

    def wait_until_finished(self) -> None:
        """Blocks until any async save has been finalized on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
