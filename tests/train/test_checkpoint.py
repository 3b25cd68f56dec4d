"""Checkpointer and PreemptionWatcher: sharded save/restore across meshes, retention, atomicity,
metadata and data-iterator round trips, and SIGTERM -> checkpoint -> clean exit in a subprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from prefjax import models, sharding
from prefjax.train.checkpoint import Checkpointer, CheckpointNotFoundError, checkpoint_size_bytes
from prefjax.train.preemption import PreemptionWatcher

ROOT = pathlib.Path(__file__).resolve().parents[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Shaped like the trainer's state: a registered dataclass pytree."""

    step: Any
    params: Any
    opt_state: Any
    loss_state: Any
    rng: Any
    ref_params: Any = None  # None (an empty subtree) unless the reference moves


def _host(tree: Any) -> Any:
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(actual: Any, expected: Any) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    flat_actual = jax.tree_util.tree_flatten_with_path(_host(actual))[0]
    for (path, a), b in zip(flat_actual, jax.tree.leaves(_host(expected)), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _train_state(cfg: models.ModelConfig, mesh: jax.sharding.Mesh, params: Any, step: int) -> TrainState:
    """params + an adamw state with replicated scalars (environment.md's count pitfall)."""
    tx = optax.adamw(1e-2)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, params), param_sh,
                                   transform_non_params=lambda _: replicated)

    def init_and_update(p: Any) -> Any:
        # One update, so the moments are non-zero and their values are worth comparing.
        return tx.update(jax.tree.map(jnp.cos, p), tx.init(p), p)[1]

    opt_state = jax.jit(init_and_update, out_shardings=opt_sh)(params)
    loss_state = {"beta": jax.device_put(jnp.float32(0.1), replicated)}
    rng = jax.device_put(jax.random.key_data(jax.random.key(3)), replicated)
    return TrainState(step=step, params=params, opt_state=opt_state, loss_state=loss_state, rng=rng)


def _abstract_state(cfg: models.ModelConfig, mesh: jax.sharding.Mesh) -> TrainState:
    """The target tree for another mesh, built only from the config and that mesh."""
    _, shapes, _ = models.abstract(cfg)
    param_sh = models.param_shardings(cfg, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                   shapes, param_sh)
    tx = optax.adamw(1e-2)
    opt_abs = jax.eval_shape(tx.init, abstract_params)
    opt_abs = optax.tree_map_params(
        tx, lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding),
        opt_abs, abstract_params,
        transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated))
    return TrainState(
        step=0,  # a Python int stands for a Python int
        params=abstract_params,
        opt_state=opt_abs,
        loss_state={"beta": jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)},
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
    )


def _single_device(tree: Any) -> Any:
    device = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device)
                        if isinstance(s, jax.ShapeDtypeStruct) else s, tree)


def _small_state(mesh: jax.sharding.Mesh, scale: float) -> dict:
    w = jnp.arange(64.0).reshape(8, 8) * scale
    return {"w": jax.device_put(w, NamedSharding(mesh, PartitionSpec("fsdp"))), "count": 5}


def _small_abstract(mesh: jax.sharding.Mesh) -> dict:
    return {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec())),
            "count": 0}


@pytest.fixture(scope="module")
def mesh8() -> jax.sharding.Mesh:
    return sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})


# -- sharded model state -----------------------------------------------------------------------


def test_model_state_restores_onto_other_meshes_and_a_single_device(tmp_path, mesh8):
    cfg = models.get_preset("llama2-tiny")
    _, params = models.init_params(cfg, mesh=mesh8)
    state = _train_state(cfg, mesh8, params, step=7)
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(state.params)} == {8}
    metadata = {"config": {"loss": "dpo", "beta": 0.1, "mesh": [1, 8, 1], "lora": None, "bf16": False},
                "git_sha": "abc123"}

    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=7)
    assert ckpt.save(7, state, metadata=metadata)
    ckpt.close()

    mesh222 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    reader = Checkpointer(str(tmp_path / "ckpt"))
    assert reader.latest_step() == 7
    for target in (_abstract_state(cfg, mesh222), _single_device(_abstract_state(cfg, mesh222))):
        restored, meta = reader.restore(7, target)
        assert meta == metadata
        assert restored.step == 7 and type(restored.step) is int
        _assert_trees_equal(restored, state)
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
            if isinstance(want, jax.ShapeDtypeStruct):
                assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)
    # The 2x2x2 target really is laid out differently from the saving mesh.
    embedding = reader.restore(7, _abstract_state(cfg, mesh222))[0].params["embedding"]
    assert embedding.sharding.shard_shape(embedding.shape) != params["embedding"].sharding.shard_shape(
        embedding.shape)
    reader.close()


# -- retention, cadence, idempotence -----------------------------------------------------------


def test_keep_n_deletes_old_steps(tmp_path, mesh8):
    with Checkpointer(str(tmp_path), keep=2, save_every=1) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, _small_state(mesh8, step))
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]
    reopened = Checkpointer(str(tmp_path), keep=2)
    assert reopened.all_steps() == [4, 5] and reopened.latest_step() == 5
    restored, _ = reopened.restore(4, _small_abstract(mesh8))
    np.testing.assert_array_equal(restored["w"], np.arange(64.0).reshape(8, 8) * 4)


def test_should_save_follows_the_cadence_and_skips_saved_steps(tmp_path, mesh8):
    ckpt = Checkpointer(str(tmp_path), save_every=10, async_save=False)
    assert [s for s in range(31) if ckpt.should_save(s)] == [10, 20, 30]
    assert not ckpt.save(15, _small_state(mesh8, 1.0))
    assert ckpt.all_steps() == [] and not any(tmp_path.iterdir())
    assert ckpt.save(20, _small_state(mesh8, 1.0))
    assert [s for s in range(31) if ckpt.should_save(s)] == [30]
    assert ckpt.save(15, _small_state(mesh8, 1.0), force=True)  # force ignores the cadence
    ckpt.close()


def test_saving_the_same_step_twice_is_a_no_op(tmp_path, mesh8):
    ckpt = Checkpointer(str(tmp_path), save_every=3)
    assert ckpt.save(3, _small_state(mesh8, 1.0))
    assert not ckpt.save(3, _small_state(mesh8, 2.0), force=True)  # first save may still be in flight
    ckpt.wait_until_finished()
    assert not ckpt.save(3, _small_state(mesh8, 3.0), force=True)
    restored, _ = ckpt.restore(3, _small_abstract(mesh8))
    np.testing.assert_array_equal(restored["w"], np.arange(64.0).reshape(8, 8))
    ckpt.close()


# -- atomicity and errors ----------------------------------------------------------------------


def test_unfinalized_tmp_directories_are_never_the_latest_step(tmp_path, mesh8):
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        ckpt.save(2, _small_state(mesh8, 2.0))
    # What a save killed mid-write leaves behind: orbax's tmp naming (current and the older
    # timestamped form), with partial contents.
    for name in ("5.orbax-checkpoint-tmp", "9.orbax-checkpoint-tmp-1700000000123"):
        (tmp_path / name / "state").mkdir(parents=True)
        (tmp_path / name / "_CHECKPOINT_METADATA").write_text("{}")
        (tmp_path / name / "state" / "partial").write_bytes(b"\0" * 100)

    ckpt = Checkpointer(str(tmp_path), save_every=1)
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
    with pytest.raises(CheckpointNotFoundError, match=r"no finalized checkpoint at step 5; "
                                                      r"available steps: 2$"):
        ckpt.restore(5, _small_abstract(mesh8))
    restored, _ = ckpt.restore(ckpt.latest_step(), _small_abstract(mesh8))
    np.testing.assert_array_equal(restored["w"], np.arange(64.0).reshape(8, 8) * 2)

    # Saving the interrupted step again replaces its tmp directory.
    assert ckpt.save(5, _small_state(mesh8, 5.0))
    ckpt.wait_until_finished()
    assert not (tmp_path / "5.orbax-checkpoint-tmp").exists() and ckpt.latest_step() == 5
    ckpt.close()


def test_missing_step_error_names_directory_and_available_steps(tmp_path, mesh8):
    ckpt = Checkpointer(str(tmp_path / "empty"))
    with pytest.raises(CheckpointNotFoundError,
                       match=r"empty: no finalized checkpoint at step 3; available steps: none"):
        ckpt.restore(3, _small_abstract(mesh8))
    with Checkpointer(str(tmp_path / "two"), save_every=1) as two:
        two.save(1, _small_state(mesh8, 1.0))
        two.save(10, _small_state(mesh8, 1.0))
    with pytest.raises(CheckpointNotFoundError, match="available steps: 1, 10"):
        Checkpointer(str(tmp_path / "two")).restore(4, _small_abstract(mesh8))
    with pytest.raises(CheckpointNotFoundError, match="available steps: 1, 10"):
        checkpoint_size_bytes(str(tmp_path / "two"), 4)
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_bad_inputs_get_clear_errors(tmp_path, mesh8):
    ckpt = Checkpointer(str(tmp_path), save_every=1, async_save=False)
    state = _small_state(mesh8, 1.0)
    with pytest.raises(TypeError, match=r"metadata\['config'\]\['schedule'\]: a function is not JSON"):
        ckpt.save(1, state, metadata={"config": {"schedule": lambda s: s}})
    with pytest.raises(TypeError, match=r"metadata\['layers'\]: key 0 is a int"):
        ckpt.save(1, state, metadata={"layers": {0: "a"}})
    with pytest.raises(TypeError, match=r"state\['rng'\] is a typed PRNG key"):
        ckpt.save(1, {**state, "rng": jax.random.key(0)})
    with pytest.raises(ValueError, match="non-negative integer"):
        ckpt.save(-1, state, force=True)
    assert ckpt.all_steps() == []
    ckpt.save(1, state)
    with pytest.raises(ValueError, match=r"abstract_state\['w'\] is a ShapeDtypeStruct without a sharding"):
        ckpt.restore(1, {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32), "count": 0})
    with pytest.raises(ValueError, match=r"(?s)/1: cannot restore into abstract_state.*zz"):
        ckpt.restore(1, {**_small_abstract(mesh8), "zz": 0})
    with pytest.raises(ValueError, match="no data-iterator state"):
        fresh = iter(grain.MapDataset.range(4).to_iter_dataset())
        ckpt.restore(1, _small_abstract(mesh8), data_iterator=fresh)
    with pytest.raises(ValueError, match="keep=0"):
        Checkpointer(str(tmp_path), keep=0)
    ckpt.close()


# -- contents --------------------------------------------------------------------------------------


def test_python_ints_and_empty_loss_state_round_trip(tmp_path, mesh8):
    replicated = NamedSharding(mesh8, PartitionSpec())
    state = TrainState(step=12, params={"w": jax.device_put(jnp.ones((8, 2)), replicated)},
                       opt_state=(3, jnp.int32(4)), loss_state={}, rng=jnp.array([1, 2], jnp.uint32))
    def spec(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    abstract = TrainState(step=0, params={"w": spec((8, 2), jnp.float32)}, opt_state=(0, spec((), jnp.int32)),
                          loss_state={}, rng=spec((2,), jnp.uint32))
    with Checkpointer(str(tmp_path), save_every=12) as ckpt:
        ckpt.save(12, state)
        restored, meta = ckpt.restore(12, abstract)
    assert meta == {}
    assert restored.step == 12 and type(restored.step) is int
    assert restored.opt_state[0] == 3 and type(restored.opt_state[0]) is int
    assert restored.loss_state == {}
    _assert_trees_equal(restored, state)


def _pipeline() -> grain.IterDataset:
    return grain.MapDataset.range(40).shuffle(seed=3).batch(4).to_iter_dataset()


def test_data_iterator_resumes_at_the_next_batch(tmp_path, mesh8):
    reference = [batch.tolist() for batch in _pipeline()]
    iterator = iter(_pipeline())
    for _ in range(3):
        next(iterator)
    with Checkpointer(str(tmp_path), save_every=3) as ckpt:
        ckpt.save(3, _small_state(mesh8, 1.0), data_iterator=iterator)
        next(iterator), next(iterator)  # the trainer keeps going while the save is in flight

    fresh = iter(_pipeline())
    Checkpointer(str(tmp_path)).restore(3, _small_abstract(mesh8), data_iterator=fresh)
    assert [batch.tolist() for batch in fresh] == reference[3:]


def test_data_loader_iterator_resumes(tmp_path, mesh8):
    def loader() -> grain.DataLoader:
        sampler = grain.samplers.IndexSampler(30, shuffle=True, seed=1, num_epochs=1)
        return grain.DataLoader(data_source=list(range(30)), sampler=sampler, worker_count=0)

    reference = list(loader())
    iterator = iter(loader())
    for _ in range(11):
        next(iterator)
    with Checkpointer(str(tmp_path), save_every=11) as ckpt:
        ckpt.save(11, _small_state(mesh8, 1.0), data_iterator=iterator)
    fresh = iter(loader())
    Checkpointer(str(tmp_path)).restore(11, _small_abstract(mesh8), data_iterator=fresh)
    assert [int(x) for x in fresh] == [int(x) for x in reference[11:]]


def test_checkpoint_size_counts_every_saved_array(tmp_path, mesh8):
    """An extra (reference-sized) tree adds about its raw bytes; a state without it does not."""
    rng = np.random.default_rng(0)
    policy = {"w": jax.device_put(rng.standard_normal((512, 256), np.float32),
                                  NamedSharding(mesh8, PartitionSpec("fsdp")))}
    reference = {"w": jax.device_put(rng.standard_normal((512, 256), np.float32),
                                     NamedSharding(mesh8, PartitionSpec("fsdp")))}
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        ckpt.save(1, {"policy": policy})
        ckpt.save(2, {"policy": policy, "reference": reference})
    raw = policy["w"].nbytes
    without, with_ref = checkpoint_size_bytes(str(tmp_path), 1), checkpoint_size_bytes(str(tmp_path), 2)
    # Random float32 barely compresses: each tree costs between 80% and 110% of its raw bytes.
    assert 0.8 * raw < without < 1.1 * raw + 16_384, (without, raw)
    assert 0.8 * raw < with_ref - without < 1.1 * raw, (with_ref, without, raw)


# -- preemption --------------------------------------------------------------------------------


def test_watcher_sets_a_flag_on_sigterm_and_restores_handlers():
    # Python's own Ctrl-C handler, whatever the test runner installed.
    runner_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        _check_watcher_signals()
    finally:
        signal.signal(signal.SIGINT, runner_sigint)
    assert signal.getsignal(signal.SIGTERM) == previous_term


def _check_watcher_signals() -> None:
    with PreemptionWatcher(handle_sigint=True) as watcher:
        assert not watcher.coordinated and not watcher.requested(0) and watcher.reason() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.requested(1) and watcher.requested()
        assert watcher.reason() == "SIGTERM received"
        # After a stop request, a second Ctrl-C falls through to the previous SIGINT handler.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    with PreemptionWatcher(handle_sigint=True) as watcher:  # a first Ctrl-C only asks to stop
        os.kill(os.getpid(), signal.SIGINT)
        assert watcher.requested() and watcher.reason() == "SIGINT received"
    with PreemptionWatcher() as watcher:  # SIGINT is left alone unless asked for
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


_TRAINER = textwrap.dedent("""
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec
    from prefjax import sharding
    from prefjax.train.checkpoint import Checkpointer
    from prefjax.train.preemption import PreemptionWatcher

    directory, mode = sys.argv[1], sys.argv[2]
    if mode == "distributed":
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[3]}", num_processes=1,
                                   process_id=0, initialization_timeout=30)
    mesh = sharding.make_mesh({"fsdp": -1})
    base = jax.device_put(jnp.arange(32.0), NamedSharding(mesh, PartitionSpec("fsdp")))
    ckpt = Checkpointer(directory, save_every=10_000)
    with PreemptionWatcher() as watcher:
        print("coordinated" if watcher.coordinated else "local", flush=True)
        for step in range(1, 100_000):
            state = {"w": base * step, "step": step}
            if mode == "distributed" and step == 3:
                os.kill(os.getpid(), 15)  # jax's C++ handler owns SIGTERM here
            if step == 3:
                print("ready", flush=True)
            if watcher.requested(step):
                ckpt.save(step, state, metadata={"reason": watcher.reason()}, force=True)
                ckpt.wait_until_finished()
                print(f"saved step {step}: {watcher.reason()}", flush=True)
                break
            time.sleep(0.01)
    ckpt.close()
""")


def _run_trainer(tmp_path: pathlib.Path, mode: str, *extra: str) -> tuple[int, str]:
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt"), mode, *extra], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:  # wait until the loop runs
            lines.append(line)
            if line.strip() == "ready":
                break
        if mode == "local":
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + out
    assert proc.returncode == 0, output + err[-3000:]
    step = int(output.split("saved step ")[1].split(":")[0])
    return step, output


def _restore_trainer_checkpoint(tmp_path: pathlib.Path, step: int, mesh8) -> tuple[dict, dict]:
    abstract = {"w": jax.ShapeDtypeStruct((32,), jnp.float32, sharding=NamedSharding(mesh8, PartitionSpec())),
                "step": 0}
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    assert ckpt.latest_step() == step
    return ckpt.restore(step, abstract)


def test_sigterm_in_a_training_loop_saves_and_exits_cleanly(tmp_path, mesh8):
    step, output = _run_trainer(tmp_path, "local")
    assert output.splitlines()[0] == "local" and step >= 3
    state, meta = _restore_trainer_checkpoint(tmp_path, step, mesh8)
    assert state["step"] == step and meta == {"reason": "SIGTERM received"}
    np.testing.assert_array_equal(state["w"], np.arange(32.0) * step)


def test_distributed_run_stops_at_jax_preemption_sync_point(tmp_path, mesh8):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    step, output = _run_trainer(tmp_path, "distributed", str(port))
    # No Python handler: the process survived SIGTERM only because jax's service caught it.
    assert output.splitlines()[0] == "coordinated" and step >= 3
    state, meta = _restore_trainer_checkpoint(tmp_path, step, mesh8)
    assert state["step"] == step and meta == {"reason": f"preemption sync point reached at step {step}"}
    np.testing.assert_array_equal(state["w"], np.arange(32.0) * step)


def test_metadata_file_is_plain_json(tmp_path, mesh8):
    """The metadata item is readable without orbax (notebooks, shell tools)."""
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        ckpt.save(1, _small_state(mesh8, 1.0), metadata={"config": {"lr": 1e-3}, "tags": ["a", "b"]})
    files = [p for p in (tmp_path / "1" / "metadata").iterdir() if p.name != "commit_success.txt"]
    assert len(files) == 1
    assert json.loads(files[0].read_text()) == {"config": {"lr": 1e-3}, "tags": ["a", "b"]}


def test_metadata_reads_alone_and_names_missing_steps(tmp_path, mesh8):
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        ckpt.save(2, _small_state(mesh8, 1.0), metadata={"config": {"loss": {"beta": 0.1}}})
    fresh = Checkpointer(str(tmp_path))  # another process's view: only what is on disk
    assert fresh.metadata(2) == {"config": {"loss": {"beta": 0.1}}}
    with pytest.raises(CheckpointNotFoundError, match="no finalized checkpoint at step 5; available steps: 2"):
        fresh.metadata(5)
    fresh.close()
