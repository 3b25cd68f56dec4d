"""Checkpointer faults: every kind of damaged file in the newest step falls back to the previous
step (moved aside, never deleted, with a warning saying what was wrong); a changed config is
not damage; a failing background save and an unwritable directory are reported at once."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from prefjax import sharding
from prefjax.train import checkpoint
from prefjax.train.checkpoint import (
    CheckpointDamagedError,
    CheckpointDirectoryError,
    Checkpointer,
    CheckpointMismatchError,
    CheckpointSaveError,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROWS, COLS = 128, 256  # large enough that zstd stores the random values verbatim (flips stay readable)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class State:
    """Shaped like the trainer's TrainState: a registered dataclass with nested leaves."""

    step: Any
    params: Any
    opt_state: Any


@pytest.fixture(scope="module")
def mesh8() -> jax.sharding.Mesh:
    return sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})


def _values(step: int, rows: int = ROWS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((rows, COLS)).astype(np.float32),
            "mu": rng.standard_normal((rows, COLS)).astype(np.float32)}


def _state(mesh: jax.sharding.Mesh, step: int, *, nan_in_mu: bool = False) -> State:
    values = _values(step)
    if nan_in_mu:
        values["mu"][3, 5] = np.nan
    sharded, replicated = NamedSharding(mesh, PartitionSpec("fsdp")), NamedSharding(mesh, PartitionSpec())
    return State(step=step, params={"w": jax.device_put(values["w"], sharded)},
                 opt_state={"mu": jax.device_put(values["mu"], sharded),
                            "count": jax.device_put(jnp.int32(step), replicated)})


def _abstract(mesh: jax.sharding.Mesh, rows: int = ROWS) -> State:
    replicated = NamedSharding(mesh, PartitionSpec())
    spec = jax.ShapeDtypeStruct((rows, COLS), jnp.float32, sharding=replicated)
    return State(step=0, params={"w": spec},
                 opt_state={"mu": spec, "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)})


def _pipeline() -> grain.IterDataset:
    return grain.MapDataset.range(40).batch(4).to_iter_dataset()


def _save_two_steps(directory: pathlib.Path, mesh: jax.sharding.Mesh, *, verify: bool = True,
                    nan_in_second: bool = False) -> None:
    """Steps 1 and 2, each after one more batch of the pipeline."""
    iterator = iter(_pipeline())
    with Checkpointer(str(directory), save_every=1, verify=verify) as ckpt:
        for step in (1, 2):
            next(iterator)
            ckpt.save(step, _state(mesh, step, nan_in_mu=nan_in_second and step == 2),
                      data_iterator=iterator, metadata={"config": {"step": step}})


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mesh8) -> pathlib.Path:
    """Two intact steps, written once; each test damages its own copy."""
    directory = tmp_path_factory.mktemp("template") / "checkpoints"
    _save_two_steps(directory, mesh8)
    return directory


@pytest.fixture
def ckpt_dir(saved, tmp_path) -> pathlib.Path:
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    return directory


def _files(directory: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def _array_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest OCDBT data file: where the arrays' chunks are."""
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _flip_a_stored_value(step_dir: pathlib.Path) -> None:
    """Flips one byte of the largest array file where the file still decodes but holds other
    numbers (checked by reading it without verification): only the checksum can tell."""
    path = _array_file(step_dir)
    original = path.read_bytes()
    abstract = _abstract(sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
    for at in range(len(original) // 2, len(original) // 2 + 40):
        path.write_bytes(original[:at] + bytes([original[at] ^ 0x10]) + original[at + 1:])
        try:
            with Checkpointer(str(step_dir.parent), verify=False) as reader:
                state, _ = reader.restore(2, abstract)
        except CheckpointDamagedError:
            continue  # this byte broke the decoding: try the next one
        if not all(np.array_equal(state.params[k] if k == "w" else state.opt_state[k], v)
                   for k, v in _values(2).items()):
            return
    raise AssertionError(f"no byte of {path} could be flipped into a readable, different value")


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(step_dir: pathlib.Path) -> None:
    for child in step_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _alter_recorded_digest(step_dir: pathlib.Path) -> None:
    path = step_dir / "integrity" / "metadata"
    record = json.loads(path.read_text())
    record["leaves"]["opt_state/mu"]["digest"] ^= 1
    path.write_text(json.dumps(record))


# (what is done to the newest step's directory, what the warning must say)
DAMAGE: dict[str, tuple[Callable[[pathlib.Path], None], str]] = {
    "array file truncated": (lambda d: _truncate(_array_file(d)),
                             r"the state item cannot be read: OUT_OF_RANGE: Error reading \"[a-z_.]+/\d"),
    "array file deleted": (lambda d: _array_file(d).unlink(), r"the state item cannot be read: \w+: Error reading"),
    "array value flipped": (_flip_a_stored_value, r"checksum mismatch in (params\['w'\]|opt_state\['mu'\])"),
    "state/_METADATA deleted": (lambda d: (d / "state" / "_METADATA").unlink(),
                                r"the state item's metadata cannot be read: Metadata file \(named _METADATA\) does"),
    "state/_METADATA garbage": (lambda d: (d / "state" / "_METADATA").write_text("not json{"),
                                r"the state item's metadata cannot be read: Expecting value"),
    "manifest deleted": (lambda d: (d / "state" / "manifest.ocdbt").unlink(),
                         r"the state item's metadata cannot be read: NOT_FOUND: .* does not exist"),
    "manifest garbage": (lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b"garbage"),
                         r"the state item's metadata cannot be read: DATA_LOSS: .*manifest.ocdbt"),
    "_CHECKPOINT_METADATA deleted": (lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
                                     r"orbax's _CHECKPOINT_METADATA file is missing"),
    "_CHECKPOINT_METADATA garbage": (lambda d: (d / "_CHECKPOINT_METADATA").write_text("\x00\x01garbage"),
                                     r"orbax's _CHECKPOINT_METADATA file is not valid JSON"),
    "metadata item deleted": (lambda d: shutil.rmtree(d / "metadata"), r"the metadata item is missing"),
    "metadata file deleted": (lambda d: (d / "metadata" / "metadata").unlink(),
                              r"the metadata item (holds no JSON object|cannot be read)"),
    "metadata garbage": (lambda d: (d / "metadata" / "metadata").write_text("{nope"),
                         r"the metadata item cannot be read: Expecting property name"),
    "integrity item deleted": (lambda d: shutil.rmtree(d / "integrity"), r"the integrity item is missing"),
    "integrity garbage": (lambda d: (d / "integrity" / "metadata").write_text("[1, 2"),
                          r"the integrity item cannot be read: Expecting"),
    "integrity garbled": (lambda d: (d / "integrity" / "metadata").write_text('{"format": 1, "leaves": 3}'),
                          r"the integrity item is garbled"),
    "recorded digest altered": (_alter_recorded_digest, r"checksum mismatch in opt_state\['mu'\]"),
    "data_iter item deleted": (lambda d: shutil.rmtree(d / "data_iter"), r"the data_iter item is missing"),
    "data_iter garbage": (lambda d: (d / "data_iter" / "process_0-of-1.json").write_text("zz"),
                          r"the data_iter item cannot be read: Expecting value"),
    "step directory emptied": (_empty, r"the step directory is empty"),
}


# orbax leaves a tensorstore future whose error nobody retrieves when a read fails: harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_step_is_moved_aside_and_the_previous_one_restored(kind, ckpt_dir, mesh8, caplog):
    damage, says = DAMAGE[kind]
    damage(ckpt_dir / "2")
    left_behind = _files(ckpt_dir / "2")
    iterator = iter(_pipeline())
    with caplog.at_level(logging.WARNING, logger="prefjax.train.checkpoint"), Checkpointer(str(ckpt_dir)) as ckpt:
        restored = ckpt.restore_latest(_abstract(mesh8), data_iterator=iterator)
        assert ckpt.all_steps() == [1]

    assert restored.step == 1 and restored.metadata == {"config": {"step": 1}}
    np.testing.assert_array_equal(restored.state.params["w"], _values(1)["w"])
    np.testing.assert_array_equal(restored.state.opt_state["mu"], _values(1)["mu"])
    assert [int(x) for x in next(iterator)] == [4, 5, 6, 7]  # step 1 had read one batch
    # Moved, never deleted: every file the damaged step still had is there.
    moved = pathlib.Path(f"{ckpt_dir}-damaged") / "2"
    assert not (ckpt_dir / "2").exists() and _files(moved) == left_behind
    warnings = [r.getMessage() for r in caplog.records if r.name == checkpoint.logger.name]
    assert len(warnings) == 1, warnings
    pattern = rf"^checkpoint step 2 in {ckpt_dir} is damaged \({says}.*\); moved it to {moved}; trying the previous step$"
    assert re.match(pattern, warnings[0]), warnings[0]
    assert restored.notes == [warnings[0].removesuffix("; trying the previous step")]


def test_every_step_damaged_returns_none_after_moving_all_aside(ckpt_dir, mesh8, caplog):
    for step in ("1", "2"):
        (ckpt_dir / step / "_CHECKPOINT_METADATA").unlink()
    (pathlib.Path(f"{ckpt_dir}-damaged") / "2").mkdir(parents=True)  # an earlier run's damaged step 2
    with caplog.at_level(logging.WARNING, logger="prefjax.train.checkpoint"), Checkpointer(str(ckpt_dir)) as ckpt:
        assert ckpt.restore_latest(_abstract(mesh8)) is None
        assert ckpt.all_steps() == [] and len(ckpt.notes) == 2
    damaged = sorted(p.name for p in pathlib.Path(f"{ckpt_dir}-damaged").iterdir())
    # The earlier copy is kept; this one gets a UTC time suffix.
    assert damaged[:2] == ["1", "2"] and len(damaged) == 3
    assert re.fullmatch(r"2-\d{8}T\d{6}\.\d{6}Z", damaged[2]), damaged
    assert "EVERY checkpoint is damaged" in caplog.records[-1].getMessage()


def test_nonfinite_state_is_skipped_with_or_without_checksums(tmp_path, mesh8, caplog):
    for verify in (True, False):  # verify=False writes no integrity item: an older run's checkpoint
        directory = tmp_path / f"verify-{verify}"
        with caplog.at_level(logging.WARNING, logger="prefjax.train.checkpoint"):
            _save_two_steps(directory, mesh8, verify=verify, nan_in_second=True)
            if verify:  # the save itself already warns
                assert "step 2 has non-finite values in opt_state['mu']" in caplog.text
            caplog.clear()
            with Checkpointer(str(directory)) as ckpt:
                restored = ckpt.restore_latest(_abstract(mesh8))
        assert restored.step == 1
        already = " (already when saved)" if verify else ""
        assert f"is damaged (non-finite values in opt_state['mu']{already}); moved it to " in caplog.text
        assert (pathlib.Path(f"{directory}-damaged") / "2" / "state").is_dir()


def test_older_checkpoints_without_checksums_still_restore(tmp_path, mesh8):
    _save_two_steps(tmp_path / "old", mesh8, verify=False)
    assert not (tmp_path / "old" / "2" / "integrity").exists()
    with Checkpointer(str(tmp_path / "old")) as ckpt:
        restored = ckpt.restore_latest(_abstract(mesh8))
    assert restored.step == 2 and restored.notes == []
    np.testing.assert_array_equal(restored.state.opt_state["mu"], _values(2)["mu"])


def test_a_changed_shape_is_a_config_change_not_damage(ckpt_dir, mesh8):
    before = _files(ckpt_dir)
    with Checkpointer(str(ckpt_dir)) as ckpt:
        with pytest.raises(CheckpointMismatchError,
                           match=r"/2: cannot restore into abstract_state: params\['w'\] has shape \(128, 256\) in "
                                 r"the checkpoint and \(64, 256\) in this run's state\. The checkpoint is intact "
                                 r"\(nothing was moved\)"):
            ckpt.restore_latest(_abstract(mesh8, rows=64))
        extra = _abstract(mesh8)
        extra.opt_state["nu"] = extra.opt_state["mu"]
        with pytest.raises(CheckpointMismatchError, match=r"this run's state has opt_state\['nu'\], the checkpoint "
                                                          r"does not"):
            ckpt.restore_latest(extra)
    assert _files(ckpt_dir) == before and not pathlib.Path(f"{ckpt_dir}-damaged").exists()


def test_records_that_contradict_each_other_are_damage_not_a_config_change(ckpt_dir, mesh8, caplog):
    """A shape mismatch is a config change only while the step's own records agree with orbax's."""
    path = ckpt_dir / "2" / "integrity" / "metadata"
    record = json.loads(path.read_text())
    record["leaves"]["params/w"]["shape"] = [64, COLS]
    path.write_text(json.dumps(record))
    shutil.copytree(ckpt_dir, ckpt_dir.parent / "copy")
    with caplog.at_level(logging.WARNING, logger="prefjax.train.checkpoint"):
        # This run wants the recorded shape, orbax has another: damage. Step 1 is intact and truly differs.
        with Checkpointer(str(ckpt_dir)) as ckpt, \
                pytest.raises(CheckpointMismatchError, match=r"/1: cannot restore into abstract_state"):
            ckpt.restore_latest(_abstract(mesh8, rows=64))
        assert "step 2 in" in caplog.text and "is damaged (the state item's metadata contradicts the integrity " \
            "record: params['w'] has shape (64, 256) in the integrity record and (128, 256) in state/_METADATA)" \
            in caplog.text
        caplog.clear()
        with Checkpointer(str(ckpt_dir.parent / "copy")) as ckpt:  # this run fits orbax's shapes
            assert ckpt.restore_latest(_abstract(mesh8)).step == 1
        assert "is damaged (the integrity record gives params['w'] shape (64, 256), the restored array has " \
            "(128, 256))" in caplog.text


def test_accept_runs_before_arrays_and_its_error_propagates(ckpt_dir, mesh8):
    seen = []

    def accept(step: int, metadata: dict) -> None:
        seen.append((step, metadata))
        raise ValueError(f"config of step {step} differs")

    (ckpt_dir / "2" / "state" / "manifest.ocdbt").unlink()  # damaged arrays: accept runs before they are read
    with Checkpointer(str(ckpt_dir)) as ckpt, pytest.raises(ValueError, match="config of step 2 differs"):
        ckpt.restore_latest(_abstract(mesh8), accept=accept)
    assert seen == [(2, {"config": {"step": 2}})] and (ckpt_dir / "2").is_dir()


def test_latest_metadata_reads_no_arrays_and_moves_unreadable_steps_aside(ckpt_dir, caplog):
    (ckpt_dir / "2" / "state" / "manifest.ocdbt").unlink()  # arrays damaged, records intact
    with Checkpointer(str(ckpt_dir)) as ckpt:
        assert ckpt.latest_metadata() == (2, {"config": {"step": 2}})
        (ckpt_dir / "2" / "metadata" / "metadata").write_text("{")
        with caplog.at_level(logging.WARNING, logger="prefjax.train.checkpoint"):
            assert ckpt.latest_metadata() == (1, {"config": {"step": 1}})
    assert "checkpoint step 2 in" in caplog.text and "the metadata item cannot be read" in caplog.text
    assert (pathlib.Path(f"{ckpt_dir}-damaged") / "2").is_dir()
    with Checkpointer(str(tmp := ckpt_dir.parent / "none")) as empty:
        assert empty.latest_metadata() is None and empty.restore_latest({}) is None
    assert tmp.is_dir()


def test_restore_of_one_step_raises_instead_of_moving(ckpt_dir, mesh8):
    (ckpt_dir / "2" / "metadata").rename(ckpt_dir / "2" / "elsewhere")
    with Checkpointer(str(ckpt_dir)) as ckpt:
        with pytest.raises(CheckpointDamagedError, match=r"/2: damaged checkpoint: the metadata item is missing"):
            ckpt.restore(2, _abstract(mesh8))
        with pytest.raises(CheckpointDamagedError, match="the metadata item is missing"):
            ckpt.metadata(2)
    assert (ckpt_dir / "2").is_dir()


# -- failures surface at once ----------------------------------------------------------------------

_FILE_SIZE_LIMITED = textwrap.dedent("""
    import os, resource, signal, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax.numpy as jnp
    import numpy as np
    from prefjax.train.checkpoint import Checkpointer, CheckpointSaveError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, write() fails with EFBIG instead
    ckpt = Checkpointer(sys.argv[1], save_every=1)
    ckpt.save(1, {"w": jnp.ones(4)})
    ckpt.wait_until_finished()
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    big = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(200_000), jnp.float32)}
    ckpt.save(2, big)
    print("save returned", flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ckpt.check_for_errors()
        except CheckpointSaveError as e:
            print("check_for_errors:", e, flush=True)
            break
        time.sleep(0.01)
    ckpt.check_for_errors()  # reported once
    for name, call in (("save", lambda: ckpt.save(3, big)), ("close", ckpt.close)):
        try:
            call()
            if name == "save":
                ckpt.wait_until_finished()
        except CheckpointSaveError as e:
            print(f"{name}:", e, flush=True)
    print("steps", ckpt.all_steps(), flush=True)
""")


def test_a_failing_background_save_is_reported_by_check_for_errors(tmp_path):
    script = tmp_path / "limited.py"
    script.write_text(_FILE_SIZE_LIMITED)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    directory = tmp_path / "ckpt"
    assert lines[0] == "save returned"
    assert lines[1] == f"check_for_errors: saving step 2 to {directory} failed: [Errno 27] File too large"
    # A later save fails the same way (its own step), and so does close; step 1 is untouched.
    assert lines[2] == f"save: saving step 3 to {directory} failed: [Errno 27] File too large"
    assert lines[3] == "steps [1]", lines
    assert issubclass(CheckpointSaveError, RuntimeError)


def test_check_for_errors_is_quiet_while_saving_and_after_success(tmp_path, mesh8):
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        ckpt.check_for_errors()
        ckpt.save(1, _state(mesh8, 1))
        ckpt.check_for_errors()  # in flight or done: nothing to report
        ckpt.wait_until_finished()
        ckpt.check_for_errors()
        assert ckpt.all_steps() == [1]


def test_an_unwritable_directory_fails_at_construction_with_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    begin = time.monotonic()
    with pytest.raises(CheckpointDirectoryError,
                       match=rf"^checkpoint directory {tmp_path}/file cannot be written: \[Errno 20\] .*; choose "
                             r"another --workdir or make it writable$"):
        Checkpointer(str(tmp_path / "file"))
    with pytest.raises(CheckpointDirectoryError, match=r"file/checkpoints cannot be written: \[Errno 20\] Not a "
                                                       r"directory"):
        Checkpointer(str(tmp_path / "file" / "checkpoints"))
    assert time.monotonic() - begin < 5
    assert issubclass(CheckpointDirectoryError, ValueError)


_READ_ONLY = textwrap.dedent("""
    import os, sys, time
    from prefjax.train.checkpoint import Checkpointer, CheckpointDirectoryError
    if os.geteuid() == 0:  # root ignores file modes: become nobody, after every import is done
        os.setgid(65534)
        os.setuid(65534)
    begin = time.monotonic()
    try:
        Checkpointer(sys.argv[1])
    except CheckpointDirectoryError as e:
        print(f"{time.monotonic() - begin:.1f}", e)
""")


def test_a_read_only_directory_fails_at_construction():
    # Not under pytest's tmp_path: its root is private to the user, and the subprocess may turn into nobody.
    parent = pathlib.Path(tempfile.mkdtemp(prefix="prefjax-ro-"))
    directory = parent / "checkpoints"
    directory.mkdir()
    directory.chmod(0o555)
    parent.chmod(0o755)
    script = parent / "ro.py"
    script.write_text(_READ_ONLY)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    try:
        proc = subprocess.run([sys.executable, str(script), str(directory)], cwd="/", env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        seconds, message = proc.stdout.strip().split(" ", 1)
        assert message == f"checkpoint directory {directory} cannot be written: [Errno 13] Permission denied; " \
                          "choose another --workdir or make it writable"
        assert float(seconds) < 5
        assert not any(directory.iterdir())
    finally:
        directory.chmod(0o755)
        shutil.rmtree(parent)
