"""Prefix-shared rows: the layout, and the step computing exactly what the unpacked layout computes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prefjax import models, roles, scoring
from prefjax.batch import Batch
from prefjax.data import prefix_sharing, synthetic_batches
from prefjax.train import loss_inputs, steps
from prefjax.train.state import TrainState


def _hand_batch():
    """Two pairs by hand: example 0 prompt [5 6 7], responses [8 9] / [10]; example 1 is empty (filler)."""
    t = 8
    tokens = np.zeros((4, t), np.int32)
    tokens[0, :5] = [5, 6, 7, 8, 9]
    tokens[2, :4] = [5, 6, 7, 10]
    segments = (tokens > 0).astype(np.int32)
    loss_mask = np.zeros((4, t), np.float32)
    loss_mask[0, 3:5] = 1
    loss_mask[2, 3] = 1
    return Batch(tokens=tokens, positions=np.tile(np.arange(t, dtype=np.int32), (4, 1)), segments=segments,
                 loss_mask=loss_mask, example_id=np.where(segments > 0, [[0], [1], [0], [1]], -1).astype(np.int32),
                 response_id=np.where(segments > 0, [[0], [0], [1], [1]], -1).astype(np.int32),
                 weight=np.array([1.0, 0.0], np.float32), scores=np.array([[1.0, 2.0], [0, 0]], np.float32),
                 margin=np.zeros(2, np.float32), label=np.ones(2, np.float32))


def test_layout_of_a_hand_made_pair():
    out = prefix_sharing.share_prefixes(_hand_batch(), multiple=4)
    assert out.tokens.shape == (2, 8)  # 3 + 2 + 1 = 6 tokens, rounded up to a multiple of 4
    np.testing.assert_array_equal(out.tokens[0], [5, 6, 7, 8, 9, 10, 0, 0])
    np.testing.assert_array_equal(out.positions[0, :6], [0, 1, 2, 3, 4, 3])
    np.testing.assert_array_equal(out.branches[0], [0, 0, 0, 1, 1, 2, 0, 0])
    np.testing.assert_array_equal(out.loss_mask[0], [0, 0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out.segments[0], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out.example_id[0], [0, 0, 0, 0, 0, 0, -1, -1])
    np.testing.assert_array_equal(out.response_id[0], [-1, -1, -1, 0, 0, 1, -1, -1])
    assert not out.segments[1].any()  # the empty filler example stays empty
    np.testing.assert_array_equal(out.weight, [1.0, 0.0])
    np.testing.assert_array_equal(out.scores, [[1.0, 2.0], [0, 0]])


def test_scored_tokens_are_never_shared_and_packed_input_is_refused():
    batch = _hand_batch()
    batch.tokens[2, 3] = 8  # both responses now start with token 8, which is scored
    out = prefix_sharing.share_prefixes(batch, multiple=1)
    np.testing.assert_array_equal(out.tokens[0, :6], [5, 6, 7, 8, 9, 8])
    np.testing.assert_array_equal(out.branches[0, :6], [0, 0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="unpacked rows"):
        prefix_sharing.share_prefixes(batch.replace(**{k: v[:3] for k, v in batch.rows().items()}))


def test_packed_blocks_share_rows_with_their_own_segments():
    batch = _hand_batch()
    # a third example (prompt [5 6], responses [3] / [4]) by widening the hand batch to 3 examples
    wide = batch.replace(**{k: np.concatenate([v[:2], np.zeros_like(v[:1]), v[2:], np.zeros_like(v[:1])])
                            for k, v in batch.rows().items()})
    for row, response in ((2, 3), (5, 4)):
        wide.tokens[row, :3] = [5, 6, response]
        wide.positions[row] = np.arange(8)
        wide.segments[row, :3] = 1
        wide.loss_mask[row, 2] = 1
        wide.example_id[row, :3] = 2
        wide.response_id[row, :3] = 0 if row == 2 else 1
    wide = wide.replace(weight=np.array([1.0, 0.0, 1.0], np.float32), scores=np.zeros((3, 2), np.float32),
                        margin=np.zeros(3, np.float32), label=np.ones(3, np.float32))
    out = prefix_sharing.share_prefixes(wide, pack_rows=1, row_length=12)
    assert out.tokens.shape == (1, 12)  # 6 + 4 tokens in one row; the empty filler takes none
    np.testing.assert_array_equal(out.tokens[0], [5, 6, 7, 8, 9, 10, 5, 6, 3, 4, 0, 0])
    np.testing.assert_array_equal(out.segments[0], [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(out.example_id[0], [0] * 6 + [2] * 4 + [-1, -1])
    np.testing.assert_array_equal(out.branches[0], [0, 0, 0, 1, 1, 2, 0, 0, 1, 2, 0, 0])
    np.testing.assert_array_equal(out.positions[0, :10], [0, 1, 2, 3, 4, 3, 0, 1, 2, 2])
    with pytest.raises(prefix_sharing.PackingOverflow, match="raise data.pack_rows"):
        prefix_sharing.share_prefixes(wide, pack_rows=1, row_length=8)
    # "drop": the block that finds no room is left out with weight 0, the others stay
    kept = prefix_sharing.share_prefixes(wide, pack_rows=1, row_length=8, overflow="drop")
    np.testing.assert_array_equal(kept.weight, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(kept.example_id[0], [0] * 6 + [-1, -1])
    assert wide.weight[2] == 1.0  # the input batch is not modified


def test_padding_to_a_common_length_keeps_branches():
    out = prefix_sharing.share_prefixes(_hand_batch(), multiple=4)
    longer = out.pad_length(12, pad_id=0)
    assert longer.branches.shape == (2, 12) and not longer.branches[:, 8:].any()


@pytest.fixture(scope="module")
def tiny():
    cfg = models.get_preset("llama2-tiny")
    return (cfg, *models.init_params(cfg, seed=0))


@pytest.mark.parametrize("num_responses", [2, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_shared_rows_give_the_unpacked_log_probs(tiny, num_responses, packed):
    cfg, graphdef, params = tiny
    batch = synthetic_batches.random_batch(4, num_responses, 40, cfg.vocab_size, seed=num_responses, fill=0.8)
    pack = dict(pack_rows=2, row_length=80 * num_responses) if packed else {}
    shared = prefix_sharing.share_prefixes(batch, multiple=16, **pack)
    if packed:  # several examples' blocks in one row
        assert shared.tokens.shape == (2, 80 * num_responses) and shared.segments.max() >= 2
    assert (shared.segments > 0).sum() < (batch.segments > 0).sum()  # each prompt once
    ref_params = jax.tree.map(lambda x: x * 1.01, params)
    out = {}
    spec = steps.StepSpec(loss_name="dpo", loss_hparams=())
    model = scoring.Model(cfg, graphdef, scoring.Tiling(chunk=8))
    for name, b in (("unpacked", batch), ("shared", shared)):
        out[name] = jax.jit(functools.partial(steps.responses, spec, model))(params, ref_params, b.map(jnp.asarray))
    np.testing.assert_allclose(out["shared"].logps, out["unpacked"].logps, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out["shared"].ref_logps, out["unpacked"].ref_logps, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out["shared"].lengths, out["unpacked"].lengths)


@pytest.mark.parametrize("packed", [False, True])
def test_shared_prefix_train_step_equals_the_unpacked_step(tiny, packed):
    cfg, graphdef, params = tiny
    batch = synthetic_batches.random_batch(4, 2, 48, cfg.vocab_size, seed=7, fill=0.9)
    pack = dict(pack_rows=2, row_length=192) if packed else {}
    shared = prefix_sharing.share_prefixes(batch, multiple=16, **pack)
    tx = optax.sgd(1.0)  # params move by exactly the gradient: compared below
    results = {}
    spec = steps.StepSpec(loss_name="dpo", loss_hparams=(("beta", 0.5),), reference=roles.Reference("frozen"),
                          columns=loss_inputs.Columns())
    for name, b in (("unpacked", batch), ("shared", shared)):
        trainable = {"model": params}
        state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                           loss_state={}, nonfinite_steps=jnp.zeros((), jnp.int32))
        fixed = roles.Fixed(reference=jax.tree.map(lambda x: x + 0.01, params))
        step = jax.jit(functools.partial(steps.train_step, spec, scoring.Model(cfg, graphdef), tx, lambda s: 1e-2))
        mb = b.map(jnp.asarray)
        state, first = step(state, fixed, mb)
        _, second = step(state, fixed, mb)
        results[name] = (first, second, state.params)
    for i in range(2):
        np.testing.assert_allclose(results["shared"][i]["loss"], results["unpacked"][i]["loss"], rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(results["shared"][2]), jax.tree.leaves(results["unpacked"][2])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_branches_hide_the_other_response_from_each_response(tiny):
    """The model itself: response 1's hidden states do not depend on response 0's tokens."""
    cfg, graphdef, params = tiny
    out = prefix_sharing.share_prefixes(_hand_batch(), multiple=4)
    run = lambda tokens: models.apply(graphdef, params, jnp.asarray(tokens),  # noqa: E731
                                      positions_BxT=jnp.asarray(out.positions),
                                      segments_BxT=jnp.asarray(out.segments),
                                      branches_BxT=jnp.asarray(out.branches))[0]
    base = run(out.tokens)
    changed = out.tokens.copy()
    changed[0, 3:5] = [11, 12]  # response 0 rewritten
    other = run(changed)
    np.testing.assert_allclose(other[0, 5], base[0, 5], atol=1e-6)  # response 1's token: unchanged
    np.testing.assert_allclose(other[0, :3], base[0, :3], atol=1e-6)  # the prompt: unchanged
    assert float(jnp.max(jnp.abs(other[0, 3:5] - base[0, 3:5]))) > 1e-4
    alone = models.apply(graphdef, params, jnp.asarray([[5, 6, 7, 10]]))[0]
    np.testing.assert_allclose(base[0, 5], alone[0, 3], atol=1e-5)  # = response 1 in its own row


def test_trainer_with_share_prefix_reproduces_the_unpacked_run(tmp_path):
    from prefjax import train
    from prefjax.train import config_lib
    from prefjax.train.metrics import read_metrics

    def run(name, **data):
        c = config_lib.trainer_config()
        c.model.preset = "llama2-tiny"
        c.total_steps, c.checkpoint.every, c.checkpoint.export_hf = 3, 3, False
        c.data.batch_size, c.data.max_len = 8, 32
        for key, value in data.items():
            c.data[key] = value
        train.run(c, str(tmp_path / name))
        return [m["loss"] for m in read_metrics(str(tmp_path / name / "metrics.jsonl")) if "loss" in m]

    shared, unpacked = run("shared", share_prefix=True), run("unpacked")
    assert len(shared) == len(unpacked) == 3
    np.testing.assert_allclose(shared, unpacked, rtol=1e-4)


def test_chat_template_pipeline_with_share_prefix_reproduces_the_unpacked_run(tmp_path):
    """Real chat-formatted pairs through the data pipeline (qwen2 fixture template and tokenizer)."""
    from pathlib import Path

    from prefjax import train
    from prefjax.data import streams
    from prefjax.train import config_lib
    from prefjax.train.metrics import read_metrics

    root = Path(__file__).parent
    source, folder = str(root / "fixtures/data/pairs_chat.jsonl"), str(root / "fixtures/hf/qwen2")

    def config(share, pack=False):
        c = config_lib.trainer_config()
        c.model.hf_folder = folder
        c.total_steps, c.checkpoint.every, c.checkpoint.export_hf = 3, 3, False
        c.optimizer.warmup_steps = 0
        c.data.source, c.data.max_len, c.data.batch_size, c.data.share_prefix = source, 128, 8, share
        if pack:  # the 8 examples' blocks (3 real, 5 fillers) packed into 8 rows of 256
            c.data.pack, c.data.pack_rows, c.data.row_length = True, 8, 256
        return c

    from prefjax.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder)
    stream = streams.make_stream(config(True), source, kind="pair", vocab_size=10**6, tokenizer=tokenizer,
                                      train=True)
    batch = next(stream)
    assert batch.tokens.shape[0] == 8 and set(np.unique(batch.branches)) <= {0, 1, 2}
    assert (batch.branches == 1).any() and (batch.branches == 2).any()
    packed = next(streams.make_stream(config(True, pack=True), source, kind="pair", vocab_size=10**6,
                                           tokenizer=tokenizer, train=True))
    assert packed.tokens.shape == (8, 256) and packed.segments.max() >= 2
    losses = {}
    for name, share, pack in (("shared", True, False), ("unpacked", False, False), ("packed", True, True)):
        train.run(config(share, pack), str(tmp_path / name))
        losses[name] = [m["loss"] for m in read_metrics(str(tmp_path / name / "metrics.jsonl")) if "loss" in m]
    assert len(losses["shared"]) == 3 and losses["shared"][-1] < losses["shared"][0]
    np.testing.assert_allclose(losses["shared"], losses["unpacked"], rtol=1e-4)
    np.testing.assert_allclose(losses["packed"], losses["unpacked"], rtol=1e-4)


@pytest.mark.parametrize("changes,match", [
    (dict(pack=True, pack_rows=8, fill_rows=True, share_prefix=True, source="pairs.jsonl"), "cannot both be set"),
    (dict(share_prefix=True, loss_name="kto"), "several responses"),
    (dict(share_prefix=True, loss_name="tdpo2"), "share_prefix=False"),
])
def test_share_prefix_conflicts_are_named(changes, match):
    from prefjax.train import config_lib

    c = config_lib.trainer_config()
    c.loss_name = changes.pop("loss_name", "dpo")
    for key, value in changes.items():
        c.data[key] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(c, num_devices=8)
