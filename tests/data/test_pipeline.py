"""prefjax.data.pipeline: sharding, shuffling, epochs, resume (also through orbax), label noise,
and global-array assembly on the 8 fake CPU devices.

Each example's weight is 1 + its index, so batches say which examples they hold.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from prefjax import sharding as sharding_lib
from prefjax.batch import processes_to_global_rows
from prefjax.data.batching import build_batch
from prefjax.data.pipeline import (
    DataConfig,
    Pipeline,
    PipelineEmptyError,
    iterate_global,
)
from prefjax.data.tokenize import PreprocessError, tokenize_example
from prefjax.models.tokenizer import load_tokenizer
from tests.deadline import run_within

TOKENIZER = load_tokenizer(Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "qwen2")
WORDS = "the small model reads a short sentence and predicts the next word".split()


def _pairs(n):
    return [
        {
            "kind": "pair",
            "format": "chat",
            "prompt": [{"role": "user", "content": " ".join(WORDS[: 1 + i % 7])}],
            "chosen": [{"role": "assistant", "content": " ".join(WORDS[i % 5 :])}],
            "rejected": [{"role": "assistant", "content": "no"}],
            "score_chosen": 1.0,
            "score_rejected": 0.0,
            "margin": math.nan,
            "weight": 1.0 + i,
            "source": f"mem:{i}",
        }
        for i in range(n)
    ]


def _unpaired(n):
    return [
        {
            "kind": "unpaired",
            "format": "chat",
            "prompt": [{"role": "user", "content": WORDS[i % 12]}],
            "completion": [{"role": "assistant", "content": "the answer"}],
            "label": i % 2 == 0,
            "weight": 1.0 + i,
            "source": f"u:{i}",
        }
        for i in range(n)
    ]


def _config(**overrides):
    values = {"batch_size": 4, "max_len": 256, "buckets": 32, "seed": 3, "read_threads": 2}
    values.update(overrides)
    return DataConfig.from_mapping(values)


@contextlib.contextmanager
def _iterator(pipe):
    it = iter(pipe)
    try:
        yield it
    finally:
        it.close()


def _collect(pipe, limit=None):
    with _iterator(pipe) as it:
        return [b for _, b in zip(range(limit) if limit else iter(int, 1), it)]


def _fields(batch):
    """A batch's arrays by field name."""
    return {**batch.rows(), **batch.columns()}


def _ids(batch):
    """Indices of the real examples of a batch, in slot order."""
    return [int(w) - 1 for w in batch.weight if w > 0]


def test_two_processes_cover_every_example_exactly_once():
    source = _pairs(37)
    shards = [_collect(Pipeline(source, TOKENIZER, _config(), shard_index=p, shard_count=2)) for p in (0, 1)]
    # equal batch counts on both processes (ceil(ceil(37 / 2) / 4) = 5), else multi-process steps hang
    assert [len(s) for s in shards] == [5, 5]
    seen = [i for shard in shards for batch in shard for i in _ids(batch)]
    assert sorted(seen) == list(range(37))
    # process 1 holds 18 examples: its last batch has 2 real examples and 2 fillers
    assert [len(_ids(b)) for b in shards[1]] == [4, 4, 4, 4, 2]
    # grain's ShardOptions name the same slice
    options = grain.sharding.ShardOptions(shard_index=1, shard_count=2)
    via_options = _collect(Pipeline(source, TOKENIZER, _config(), shard_options=options))
    assert [_ids(b) for b in via_options] == [_ids(b) for b in shards[1]]


def test_epochs_reshuffle_and_repeat():
    source = _pairs(12)
    batches = _collect(Pipeline(source, TOKENIZER, _config(num_epochs=2)))
    order = [i for b in batches for i in _ids(b)]
    assert len(batches) == 6 and sorted(order[:12]) == sorted(order[12:]) == list(range(12))
    assert order[:12] != order[12:]  # each epoch is shuffled differently


def test_seeded_shuffle_is_deterministic():
    source = _pairs(20)
    first = _collect(Pipeline(source, TOKENIZER, _config(seed=5)))
    again = _collect(Pipeline(source, TOKENIZER, _config(seed=5)))
    other = _collect(Pipeline(source, TOKENIZER, _config(seed=6)))
    plain = _collect(Pipeline(source, TOKENIZER, _config(shuffle=False)))
    assert len(first) == len(again)
    for a, b in zip(first, again):
        _assert_same(a, b)
    order = lambda bs: [i for b in bs for i in _ids(b)]  # noqa: E731
    assert order(first) != order(other) and sorted(order(first)) == sorted(order(other))
    assert order(plain) == list(range(20))


def test_batches_match_direct_tokenization():
    source = _pairs(8)
    cfg = _config(shuffle=False, prefetch_batches=0)
    batch = _collect(Pipeline(source, TOKENIZER, cfg), limit=1)[0]
    tokenized = [tokenize_example(source[i], TOKENIZER) for i in range(4)]
    want, _ = build_batch(tokenized, 4, 2, cfg.layout, TOKENIZER.pad_token_id)
    assert _fields(batch).keys() == _fields(want).keys()
    for key, value in _fields(want).items():
        np.testing.assert_array_equal(_fields(batch)[key], value)


def _assert_same(a, b):
    a, b = _fields(a), _fields(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _assert_resumes(source, cfg, skip, take):
    """After `skip` batches, a fresh pipeline set to the iterator's state yields the same next `take`."""
    with _iterator(Pipeline(source, TOKENIZER, cfg)) as it:
        for _ in range(skip):
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(take)]
    with _iterator(Pipeline(source, TOKENIZER, cfg)) as resumed:
        resumed.set_state(state)
        for want in expected:
            _assert_same(next(resumed), want)


def test_resume_from_state_yields_the_same_next_batches():
    _assert_resumes(_pairs(10), _config(num_epochs=None), skip=4, take=3)  # infinite: crosses epochs


def test_resume_through_orbax(tmp_path):
    source = _pairs(10)
    cfg = _config(num_epochs=3)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    with _iterator(Pipeline(source, TOKENIZER, cfg)) as it:
        for _ in range(3):
            next(it)
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = [next(it) for _ in range(2)]
    with _iterator(Pipeline(source, TOKENIZER, cfg)) as fresh:
        restored = manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
        resumed = restored["data"]
        for want in expected:
            _assert_same(next(resumed), want)
    manager.close()


@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_label_noise_flips_an_exact_count_of_pairs(rate):
    n = 40
    source = _pairs(n)
    pipe = Pipeline(source, TOKENIZER, _config(label_noise=rate, label_noise_seed=11))
    batches = _collect(pipe)
    flipped = []
    for batch in batches:
        B = batch.weight.shape[0]
        lengths = batch.segments.reshape(2, B, -1).sum(-1)  # tokens of (chosen, rejected) per example
        for b, w in enumerate(batch.weight):
            if w == 0:
                continue
            swapped_scores = batch.scores[b, 0] < batch.scores[b, 1]
            # the rejected answer "no" is the shortest response: it moved to slot 0 iff flipped
            swapped_tokens = lengths[0, b] < lengths[1, b]
            assert swapped_scores == swapped_tokens
            if swapped_scores:
                flipped.append(int(w) - 1)
    assert len(flipped) == math.floor(rate * n + 0.5)
    assert sorted(flipped) == np.nonzero(pipe.label_flips)[0].tolist()
    assert pipe.stats()["label_noise/flipped"] == len(flipped)
    # every process picks the same examples (the draw is over the whole source)
    other = Pipeline(
        source, TOKENIZER, _config(label_noise=rate, label_noise_seed=11), shard_index=1, shard_count=2
    )
    assert np.array_equal(other.label_flips, pipe.label_flips)


def test_label_noise_flips_unpaired_labels():
    source = _unpaired(20)
    batches = _collect(Pipeline(source, TOKENIZER, _config(label_noise=0.3, shuffle=False)))
    labels = {int(w) - 1: lab for b in batches for w, lab in zip(b.weight, b.label) if w > 0}
    changed = [i for i in range(20) if labels[i] != float(source[i]["label"])]
    assert len(changed) == 6


def test_dropped_examples_keep_batch_counts_equal():
    source = _pairs(30)
    cfg = _config(max_len=96, response_mode="drop", buckets=None)
    too_long = {
        i
        for i in range(30)
        if max(tokenize_example(source[i], TOKENIZER).sequence_length(k) for k in range(2)) > 96
    }
    assert 0 < len(too_long) < 30
    pipes = [Pipeline(source, TOKENIZER, cfg, shard_index=p, shard_count=2) for p in (0, 1)]
    shards = [_collect(p) for p in pipes]
    assert len(shards[0]) == len(shards[1]) == 4  # ceil(15 / 4)
    seen = sorted(i for shard in shards for b in shard for i in _ids(b))
    assert seen == sorted(set(range(30)) - too_long)
    assert sum(p.stats()["truncation/dropped"] for p in pipes) == len(too_long)


def test_bad_examples_raise_or_are_dropped():
    source = _pairs(8)
    source[5] = dict(source[5], chosen=[{"role": "user", "content": "no assistant"}])
    with pytest.raises(PreprocessError, match="mem:5"):
        _collect(Pipeline(source, TOKENIZER, _config(shuffle=False, prefetch_batches=0)))
    pipe = Pipeline(source, TOKENIZER, _config(shuffle=False, on_error="drop"))
    seen = [i for b in _collect(pipe) for i in _ids(b)]
    assert seen == [0, 1, 2, 3, 4, 6, 7] and pipe.stats()["errors_dropped"] == 1


def test_packed_pipeline_shapes():
    cfg = _config(pack=True, pack_rows=4, row_length=256, shuffle=False)
    batch = _collect(Pipeline(_pairs(8), TOKENIZER, cfg), limit=1)[0]
    assert batch.tokens.shape == (4, 256) and batch.weight.shape == (4,)
    assert set(batch.example_id[batch.segments > 0].tolist()) == {0, 1, 2, 3}


def test_data_config_from_mapping():
    cfg = ml_collections.ConfigDict(
        {
            "batch_size": 2,
            "max_len": 48,
            "max_prompt_len": 16,
            "buckets": [16, 32],
            "end_of_turn_tokens": ["<|im_end|>"],
            "label_noise": 0.1,
        }
    )
    data = DataConfig.from_mapping(cfg)
    assert (
        data.truncation.max_len == 48 and data.layout.max_len == 48 and data.truncation.max_prompt_len == 16
    )
    assert data.layout.buckets == (16, 32) and data.render.end_of_turn_tokens == ("<|im_end|>",)
    with pytest.raises(ValueError, match=r"unknown keys \['batchsize'\]; valid keys are .*batch_size"):
        DataConfig.from_mapping({"batchsize": 2, "max_len": 48})
    with pytest.raises(ValueError, match=r"missing required keys \['max_len'\]"):
        DataConfig.from_mapping({"batch_size": 2})


@pytest.mark.parametrize("mesh_shape", [{"data": -1}, {"data": 2, "fsdp": 4}, {"data": 4, "tensor": 2}])
def test_global_arrays_on_a_mesh_of_8_devices(mesh_shape):
    assert jax.device_count() == 8
    mesh = sharding_lib.make_mesh(mesh_shape)
    pipe = Pipeline(_pairs(16), TOKENIZER, _config(batch_size=8))
    batch = _collect(pipe, limit=1)[0]
    arrays = _fields(pipe.to_global(batch, mesh))
    assert arrays.keys() == _fields(batch).keys()
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    for key, value in arrays.items():
        assert isinstance(value, jax.Array) and value.shape == _fields(batch)[key].shape
        np.testing.assert_array_equal(np.asarray(value), _fields(batch)[key])
        assert value.sharding.mesh.shape == mesh.shape
        assert value.sharding.spec[0] == ("data", "fsdp")  # the "batch" logical axis
        assert all(axis is None for axis in value.sharding.spec[1:])
        # each device holds its 1/batch_devices slice of the leading axis
        shard = value.addressable_shards[0]
        assert shard.data.shape[0] == value.shape[0] // batch_devices


def test_two_process_assembly_keeps_the_layout_guarantee():
    """What Batch.to_global does with 2 processes, simulated: stack the local slices, offset
    example ids, reorder; row k * B + b must hold response k of global example b."""
    source = _pairs(16)
    cfg = _config(batch_size=4, buckets=None)
    local = [
        _collect(Pipeline(source, TOKENIZER, cfg, shard_index=p, shard_count=2), limit=1)[0] for p in (0, 1)
    ]
    Bl, K = 4, 2
    stacked = {key: np.concatenate([_fields(local[p])[key] for p in (0, 1)]) for key in _fields(local[0])}
    ids = np.concatenate(
        [np.where(local[p].example_id >= 0, local[p].example_id + p * Bl, -1) for p in (0, 1)]
    )
    rows = {key: processes_to_global_rows(stacked[key], 2, K) for key in ("tokens", "loss_mask")}
    rows["example_id"] = processes_to_global_rows(ids, 2, K)
    B = 2 * Bl
    for p in (0, 1):
        for bl in range(Bl):
            b = p * Bl + bl
            assert stacked["weight"][b] == local[p].weight[bl]
            for k in range(K):
                np.testing.assert_array_equal(rows["tokens"][k * B + b], local[p].tokens[k * Bl + bl])
                np.testing.assert_array_equal(
                    rows["loss_mask"][k * B + b], local[p].loss_mask[k * Bl + bl]
                )
                assert set(rows["example_id"][k * B + b].tolist()) - {-1} == {b}
    # same function under jit on a global array, as Batch.to_global runs it
    jitted = jax.jit(lambda x: processes_to_global_rows(x, 2, K))(stacked["tokens"])
    np.testing.assert_array_equal(np.asarray(jitted), rows["tokens"])


def test_global_batch_single_process_is_unchanged():
    mesh = sharding_lib.make_mesh({"data": -1})
    pipe = Pipeline(_pairs(8), TOKENIZER, _config(batch_size=8, shuffle=False))
    batch = _collect(pipe, limit=1)[0]
    arrays = batch.to_global(mesh)
    np.testing.assert_array_equal(np.asarray(arrays.example_id), batch.example_id)
    with _iterator(pipe) as it:
        first = _fields(next(iterate_global(pipe, mesh, it)))
    for key, value in _fields(batch).items():
        np.testing.assert_array_equal(np.asarray(first[key]), value)


_TWO_PROCESS_SCRIPT = r"""
import sys
import jax
import numpy as np
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[2]}", num_processes=2,
                           process_id=int(sys.argv[1]), initialization_timeout=60)
from jax.experimental import multihost_utils
sys.path.insert(0, sys.argv[3])
from tests.data.test_pipeline import TOKENIZER, _config, _pairs
from prefjax import sharding as sharding_lib
from prefjax.data.pipeline import Pipeline
from prefjax.data.tokenize import tokenize_example

source = _pairs(16)
for i in range(0, 16, 2):  # process 0 reads the even examples: make them longer, so the buckets differ
    source[i]["chosen"][0]["content"] = " ".join(["the small model reads"] * 6)
pipe = Pipeline(source, TOKENIZER, _config(batch_size=2, shuffle=False, buckets=32))
it = iter(pipe)
local = next(it)
it.close()
mesh = sharding_lib.make_mesh({"data": -1})
arrays = pipe.to_global(local, mesh)
full = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in arrays.rows().items()}
full.update({k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in arrays.columns().items()})
B = full["weight"].shape[0]
assert B == 4, B
for b in range(B):
    tokenized = tokenize_example(source[int(full["weight"][b]) - 1], TOKENIZER)
    for k in range(2):
        ids, mask = tokenized.sequence(k)
        row = k * B + b
        assert full["tokens"][row, :len(ids)].tolist() == ids.tolist(), (b, k)
        assert full["loss_mask"][row, :len(ids)].tolist() == mask.tolist(), (b, k)
        assert set(full["example_id"][row].tolist()) == {b, -1}, (b, k)
        assert full["segments"][row, len(ids):].sum() == 0
print("OK", jax.process_index(), sorted(int(w) - 1 for w in full["weight"]), full["tokens"].shape[1],
      local.tokens.shape[1])
"""


@pytest.mark.slow
def test_two_real_processes_assemble_the_global_layout(tmp_path):
    """Two JAX processes (4 CPU devices each): global batch keeps row k * B + b = response k of example b."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "two_process.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    root = str(Path(__file__).resolve().parent.parent.parent)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(p), str(port), root],
            env=env,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in (0, 1)
    ]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        outputs.append((proc.returncode, out, err))
    for code, _, err in outputs:
        assert code == 0, err[-3000:]
    lines = [out.strip().splitlines()[-1] for _, out, _ in outputs]
    assert lines[0].startswith("OK 0 [0, 1, 2, 3]") and lines[1].startswith("OK 1 [0, 1, 2, 3]")
    # the processes bucketed differently and agreed on the longer row length
    t0 = [int(x) for x in lines[0].split()[-2:]]
    t1 = [int(x) for x in lines[1].split()[-2:]]
    assert t0[0] == t1[0] == max(t0[1], t1[1]) and t0[1] != t1[1]


# --- batches by packed-row capacity (fill_packed_rows) ------------------------------------------


def _skewed_pairs(n, seed=0):
    """Pairs whose lengths vary a lot: most short, a few long (a length-skewed dataset)."""
    rng = np.random.default_rng(seed)
    rows = _pairs(n)
    for i, row in enumerate(rows):
        words = int(min(80, rng.lognormal(1.5, 1.0))) + 1
        row["chosen"] = [{"role": "assistant", "content": " ".join(WORDS[j % len(WORDS)] for j in range(words))}]
    return rows


def _fill_config(**overrides):
    values = dict(batch_size=32, max_len=128, pack=True, pack_rows=4, row_length=128, fill_packed_rows=True,
                  shuffle=False, num_epochs=1)
    values.update(overrides)
    return _config(**values)


def test_fill_packed_rows_batches_by_capacity_and_keeps_every_example_once():
    source = _skewed_pairs(120)
    batches = _collect(Pipeline(source, TOKENIZER, _fill_config()))
    seen = [i for batch in batches for i in _ids(batch)]
    assert seen == list(range(120))  # in order, each exactly once, none dropped
    counts = [len(_ids(b)) for b in batches]
    assert max(counts) <= 32 and len(set(counts)) > 1  # the number of examples per batch follows the lengths
    for batch in batches:
        assert batch.tokens.shape == (4, 128) and batch.weight.shape == (32,)
        # every slot (real or filler) has both responses in the rows: no empty response
        ids, resp = batch.example_id, batch.response_id
        present = {(int(e), int(k)) for e, k in zip(ids[batch.segments > 0], resp[batch.segments > 0])}
        assert present == {(e, k) for e in range(32) for k in range(2)}
    # a batch closes only when the next example would not fit: adding the next batch's first
    # example to a (non-final) batch overflows its rows or its 32 slots
    from prefjax.data.packing import PackingOverflow, pack_sequences
    from prefjax.data.tokenize import tokenize_example as tok

    lengths = {i: [tok(source[i], TOKENIZER).sequence_length(k) for k in range(2)] for i in range(120)}
    for batch, following in zip(batches, batches[1:]):
        members = _ids(batch) + [_ids(following)[0]]
        fillers = [[2, 2]] * (32 - len(members))
        with pytest.raises(PackingOverflow):
            if len(members) > 32:
                raise PackingOverflow("slots")
            pack_sequences([lengths[i] for i in members] + fillers, 128, 4, "error")


def test_fill_packed_rows_fills_more_of_the_rows_than_a_fixed_count():
    source = _skewed_pairs(400, seed=1)

    def real_fraction(cfg):
        pipe = Pipeline(source, TOKENIZER, cfg)
        _collect(pipe)
        stats = pipe.stats()
        return stats["padding/real_tokens"] / stats["padding/slots"]

    # A fixed count of 16 pairs needs rows for its heaviest batch: the fewest rows of 512 that
    # hold every batch (an oracle choice). Filling the same rows takes whatever fits instead
    # (at most 24 pairs: slots for fillers cost rows too, so the bound stays near the typical fill).
    from prefjax.data.packing import PackingOverflow

    rows = 1
    while True:
        try:
            fixed = real_fraction(_fill_config(fill_packed_rows=False, batch_size=16, pack_rows=rows, row_length=512))
            break
        except PackingOverflow:
            rows += 1
    filled = real_fraction(_fill_config(batch_size=24, pack_rows=rows, row_length=512))
    assert filled > 0.9 and filled > fixed + 0.1, (rows, fixed, filled)


def test_fill_packed_rows_resumes_from_state_with_the_held_example():
    # The example that did not fit batch 3 is held for batch 4: the state must bring it back.
    _assert_resumes(_skewed_pairs(60, seed=2), _fill_config(num_epochs=None, shuffle=True), skip=3, take=4)


def test_fill_packed_rows_needs_packing_and_one_process_for_finite_epochs():
    with pytest.raises(ValueError, match="needs a packed layout"):
        _config(fill_packed_rows=True)
    with pytest.raises(ValueError, match="processes would disagree"):
        Pipeline(_pairs(8), TOKENIZER, _fill_config(), shard_index=0, shard_count=2)
    # repeating data is fine with several processes: each makes batches as its data fills
    batch = _collect(Pipeline(_pairs(8), TOKENIZER, _fill_config(num_epochs=None), shard_index=1, shard_count=2),
                     limit=1)[0]
    assert set(_ids(batch)) <= set(range(1, 8, 2))


def test_row_filler_keeps_room_for_the_fillers():
    from prefjax.data.packing import RowFiller

    filler = RowFiller(row_length=10, num_rows=2, batch_size=3, num_responses=2)
    # rows [10, 10] -> [2, 10]; the 2 fillers still to come need 4 sequences of 2: room for 1 + 5
    assert filler.take([4, 4])
    assert filler.free == [2, 10] and filler.count == 1
    # [5, 5] would fill row 1 ([2, 0]): the last filler's 2 sequences would find room for 1
    assert not filler.take([5, 5])
    assert filler.free == [2, 10] and filler.count == 1  # a refused example changes nothing
    assert filler.take([3, 3])  # -> [2, 4]: room for 3 filler sequences, 2 needed
    assert not filler.take([3, 3])  # fits no row whole; one 3 goes to row 1, the other finds no room
    assert filler.take([1, 1])  # -> [0, 4], no filler left to place
    assert filler.count == 3 and not filler.take([1, 1])  # 3 examples is the batch size
    assert filler.count == 3 and filler.free == [0, 4]
    filler.reset()
    assert filler.count == 0 and filler.free == [10, 10]


# ---------------------------------------------------------------------------
# Degenerate data never hangs: every case ends within a deadline, with an error or batches
# ---------------------------------------------------------------------------

DEADLINE = 60  # seconds; each case below takes well under one


def _first_batches(pipe, limit=3):
    """Up to `limit` batches of a fresh iterator, or the error that ends it."""
    return run_within(DEADLINE, _collect, pipe, limit)


@pytest.mark.parametrize("num_epochs", [None, 1])
def test_every_example_dropped_by_truncation_raises_with_the_reason(num_epochs):
    # Every pair is longer than 8 tokens and response_mode="drop": before the pass check a
    # repeating pipeline searched forever and a finite one yielded only filler batches.
    cfg = _config(max_len=8, response_mode="drop", buckets=None, num_epochs=num_epochs)
    with pytest.raises(PipelineEmptyError, match=r"all 10 examples of one pass over the data were dropped: "
                                                 r"10 with prompt \+ response over max_len=8 "
                                                 r"\(response_mode='drop'") as err:
        _first_batches(Pipeline(_pairs(10), TOKENIZER, cfg))
    assert err.value.counts == {"sequence_too_long": 10}


def test_every_prompt_dropped_names_max_prompt_len():
    cfg = _config(max_prompt_len=2, prompt_mode="drop", num_epochs=None)
    with pytest.raises(PipelineEmptyError, match=r"10 with a prompt over max_prompt_len=2 \(prompt_mode='drop'\)"):
        _first_batches(Pipeline(_pairs(10), TOKENIZER, cfg))


def test_every_example_a_tokenization_error_under_drop_raises_with_the_first_error():
    source = [dict(p, chosen=[{"role": "user", "content": "no assistant"}]) for p in _pairs(6)]
    cfg = _config(on_error="drop", num_epochs=None, shuffle=False)
    with pytest.raises(PipelineEmptyError, match=r"6 that could not be tokenized \(on_error='drop'; the first: "
                                                 r"mem:\d") as err:
        _first_batches(Pipeline(source, TOKENIZER, cfg))
    assert err.value.counts == {"preprocess_error": 6}


def test_an_empty_source_raises_with_what_loading_skipped():
    from prefjax.data.records import LoadSummary
    from prefjax.data.sources import ListSource

    with pytest.raises(PipelineEmptyError, match="the data source holds no examples; nothing to train on"):
        Pipeline([], TOKENIZER, _config())
    skipped = LoadSummary(rows=3)
    skipped.skipped["missing_field"] = 3
    with pytest.raises(PipelineEmptyError, match=r"holds no examples \(3 rows read, 0 examples; skipped 3 bad rows: "
                                                 r"missing_field=3"):
        Pipeline(ListSource([], skipped), TOKENIZER, _config())


def test_a_few_surviving_examples_keep_a_repeating_pipeline_going():
    # One pair in 10 survives: each pass keeps one, and no pass check fires however the
    # shuffle orders it (the survivor first in one pass and last in the next is 18 drops in a row).
    source = _pairs(10)
    long = dict(source[0], chosen=[{"role": "assistant", "content": " ".join(WORDS * 20)}])
    source = [source[3]] + [dict(long, weight=1.0 + i, source=f"mem:{i}") for i in range(1, 10)]
    cfg = _config(max_len=128, response_mode="drop", buckets=None, num_epochs=None, batch_size=4)
    pipe = Pipeline(source, TOKENIZER, cfg)
    batches = _first_batches(pipe, limit=6)
    assert [_ids(b) for b in batches] == [[3, 3, 3, 3]] * 6
    assert pipe.stats()["truncation/dropped"] >= 9 * 24  # 24 passes read, 9 dropped in each


def test_fewer_examples_than_a_batch_once_gives_one_completed_batch():
    # num_epochs=1 (an eval source, say): one batch, completed with weight-0 fillers, then the end.
    batches = _first_batches(Pipeline(_pairs(3), TOKENIZER, _config(num_epochs=1, batch_size=8)), limit=10)
    assert len(batches) == 1 and sorted(_ids(batches[0])) == [0, 1, 2] and len(batches[0].weight) == 8


def test_fewer_examples_than_a_batch_repeated_fill_every_batch():
    batches = _first_batches(Pipeline(_pairs(3), TOKENIZER, _config(num_epochs=None, batch_size=8)), limit=3)
    assert len(batches) == 3 and all(len(_ids(b)) == 8 for b in batches)
    assert all(sorted(set(_ids(b))) == [0, 1, 2] for b in batches[1:])


def _wide_pairs(n):
    """Pairs whose two sequences (~60 tokens each) cannot share one packed row of 96."""
    return [dict(p, chosen=[{"role": "assistant", "content": " ".join(WORDS * 4)}],
                 rejected=[{"role": "assistant", "content": " ".join(WORDS[::-1] * 4)}]) for p in _pairs(n)]


@pytest.mark.parametrize("fill", [False, True])
def test_packed_rows_too_small_for_any_example(fill):
    pairs = _wide_pairs(6)
    assert all(tokenize_example(p, TOKENIZER).sequence_length(0) > 48 for p in pairs)
    layout = dict(pack=True, pack_rows=1, row_length=96, max_len=96, buckets=None, num_epochs=None,
                  fill_packed_rows=fill)
    with pytest.raises(PipelineEmptyError, match=r"6 that fit no 1 empty packed rows of 96 tokens "
                                                 r"\(pack_overflow='drop'\): raise pack_rows or row_length"):
        _first_batches(Pipeline(pairs, TOKENIZER, _config(**layout, pack_overflow="drop")))
    from prefjax.data.packing import PackingOverflow

    with pytest.raises(PackingOverflow, match="does not fit in 1 packed rows of 96"):
        _first_batches(Pipeline(pairs, TOKENIZER, _config(**layout, pack_overflow="error")))
    # two rows hold them: training data again, and nothing counted as unfittable
    pipe = Pipeline(pairs, TOKENIZER, _config(**{**layout, "pack_rows": 2}, pack_overflow="drop", batch_size=1))
    assert all(len(_ids(b)) == 1 for b in _first_batches(pipe))
    assert pipe.stats()["pack_unfittable_dropped"] == 0


def test_unfittable_examples_are_dropped_before_batching_and_counted():
    # Mixed data: the wide pairs (~210 + 210 tokens) fit no single row of 256, the short ones
    # (< 180) do; the wide ones take no slot.
    pairs = _pairs(6) + [dict(p, weight=7.0 + i) for i, p in enumerate(_wide_pairs(2))]
    cfg = _config(pack=True, pack_rows=1, row_length=256, max_len=256, buckets=None, shuffle=False,
                  pack_overflow="drop", batch_size=1)
    pipe = Pipeline(pairs, TOKENIZER, cfg)
    batches = _first_batches(pipe, limit=10)
    assert [i for b in batches for i in _ids(b)] == [0, 1, 2, 3, 4, 5]
    assert pipe.stats()["pack_unfittable_dropped"] == 2


def test_one_process_whose_share_is_all_dropped_says_which():
    # Without shuffling, process 1 reads the odd positions: all of them too long here.
    source = _pairs(8)
    long = {"role": "assistant", "content": " ".join(WORDS * 20)}
    source = [p if i % 2 == 0 else dict(p, chosen=[long]) for i, p in enumerate(source)]
    cfg = _config(max_len=128, response_mode="drop", buckets=None, shuffle=False, num_epochs=None)
    assert len(_first_batches(Pipeline(source, TOKENIZER, cfg, shard_index=0, shard_count=2))) == 3
    with pytest.raises(PipelineEmptyError, match=r"all 4 examples of process 1's share of one pass over the "
                                                 r"data \(8 in all\) were dropped"):
        _first_batches(Pipeline(source, TOKENIZER, cfg, shard_index=1, shard_count=2))


@pytest.mark.parametrize("num_examples, shard_count", [(1, 1), (7, 1), (7, 2), (7, 3), (2, 5), (12, 4)])
def test_pass_shares_add_up_to_the_data(num_examples, shard_count):
    from prefjax.data.pipeline import _PassCheck

    checks = [_PassCheck(num_examples, s, shard_count, describe=str) for s in range(shard_count)]
    for epoch in range(5):
        assert sum(c.share(epoch) for c in checks) == num_examples
    # and each share is the positions that process reads
    for s, check in enumerate(checks):
        positions = range(s, 5 * num_examples, shard_count)
        for epoch in range(5):
            assert check.share(epoch) == sum(1 for p in positions if p // num_examples == epoch)
