"""prefjax.data.packing and batching: buckets, the unpacked layout guarantee, packing, filler, waste."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prefjax.data.batching import build_batch
from prefjax.data.packing import (
    LayoutConfig,
    PackingOverflow,
    PaddingStats,
    batch_padding,
    bucket_length,
    bucket_lengths,
    pack_sequences,
)
from prefjax.data.tokenize import TokenizedExample

PAD = 0


def _examples(seed, n, num_responses=2, max_prompt=12, max_response=10):
    """Random tokenized examples; ids never equal PAD; mask 0 on each response's first token sometimes."""
    rng = np.random.default_rng(seed)
    out = []
    for e in range(n):
        prompt = rng.integers(1, 500, rng.integers(1, max_prompt + 1)).astype(np.int32)
        responses = [
            rng.integers(1, 500, rng.integers(1, max_response + 1)).astype(np.int32)
            for _ in range(num_responses)
        ]
        masks = [np.ones(len(r), np.int8) for r in responses]
        for m in masks:
            m[0] = rng.integers(0, 2) if len(m) > 1 else 1
        out.append(
            TokenizedExample(
                kind="pair" if num_responses == 2 else "ranked",
                prompt_ids=prompt,
                response_ids=responses,
                response_masks=masks,
                weight=1.0 + e,
                scores=tuple(float(rng.normal()) for _ in range(num_responses)),
                margin=float(e),
                label=1.0,
                source=f"x:{e}",
            )
        )
    return out


def test_bucket_lengths():
    assert bucket_lengths(100, "pow2", min_bucket=16) == [16, 32, 64, 100]
    assert bucket_lengths(128, "pow2", min_bucket=16) == [16, 32, 64, 128]
    assert bucket_lengths(200, 64) == [64, 128, 192, 200]
    assert bucket_lengths(200, None) == [200]
    assert bucket_lengths(200, [50, 300, 120]) == [50, 120, 200]
    assert bucket_length(33, 100, "pow2") == 64
    assert bucket_length(64, 100, "pow2") == 64
    assert bucket_length(65, 100, "pow2") == 100
    assert bucket_length(1, 200, 64) == 64
    with pytest.raises(ValueError, match="exceeds max_len"):
        bucket_length(101, 100, "pow2")
    with pytest.raises(ValueError, match="buckets"):
        bucket_lengths(100, "fibonacci")


def test_unpacked_layout_guarantee():
    examples = _examples(0, 5)
    batch_size = 5
    layout = LayoutConfig(max_len=64, buckets=16)
    batch, left_out = build_batch(examples, batch_size, 2, layout, PAD)
    assert left_out == 0
    longest = max(ex.sequence_length(k) for ex in examples for k in range(2))
    T = batch.tokens.shape[1]
    assert T == -(-longest // 16) * 16 and batch.tokens.shape == (2 * batch_size, T)
    for b, ex in enumerate(examples):
        for k in range(2):
            row = k * batch_size + b
            ids = np.concatenate([ex.prompt_ids, ex.response_ids[k]])
            mask = np.concatenate([np.zeros(len(ex.prompt_ids)), ex.response_masks[k]])
            n = len(ids)
            assert batch.tokens[row, :n].tolist() == ids.tolist()
            assert batch.tokens[row, n:].tolist() == [PAD] * (T - n)
            assert batch.loss_mask[row].tolist() == mask.tolist() + [0.0] * (T - n)
            assert batch.positions[row, :n].tolist() == list(range(n))
            assert batch.segments[row].tolist() == [1] * n + [0] * (T - n)
            assert batch.example_id[row].tolist() == [b] * n + [-1] * (T - n)
            assert batch.response_id[row].tolist() == [k] * n + [-1] * (T - n)
    assert batch.weight.tolist() == [ex.weight for ex in examples]
    assert np.allclose(batch.scores, [ex.scores for ex in examples])
    assert batch.margin.tolist() == [ex.margin for ex in examples]
    # reshape(K, B, T) puts response k of example b at [k, b]
    assert np.array_equal(batch.tokens.reshape(2, batch_size, T)[1, 3], batch.tokens[batch_size + 3])
    assert {k: v.dtype for k, v in {**batch.rows(), **batch.columns()}.items()} == {
        "tokens": np.int32,
        "positions": np.int32,
        "segments": np.int32,
        "loss_mask": np.float32,
        "example_id": np.int32,
        "response_id": np.int32,
        "weight": np.float32,
        "scores": np.float32,
        "margin": np.float32,
        "label": np.float32,
    }


def test_partial_batch_gets_weight_zero_fillers():
    examples = _examples(1, 3)
    batch, _ = build_batch(examples, 5, 2, LayoutConfig(max_len=64, buckets=None), PAD)
    assert batch.tokens.shape == (10, 64)
    assert batch.weight.tolist() == [1.0, 2.0, 3.0, 0.0, 0.0]
    assert np.isnan(batch.scores[3:]).all() and np.isnan(batch.margin[3:]).all()
    for b in (3, 4):
        for k in range(2):
            row = batch.segments[k * 5 + b]
            assert row.sum() == 2  # two tokens: pad prompt, pad response
            assert batch.loss_mask[k * 5 + b].sum() == 1  # one scored: no empty responses
    counts = batch_padding(batch)
    assert counts["filler_examples"] == 2 and counts["filler_tokens"] == 8
    assert counts["real_tokens"] == sum(ex.sequence_length(k) for ex in examples for k in range(2))
    assert counts["pad_tokens"] == counts["slots"] - counts["real_tokens"] - counts["filler_tokens"]


def _per_sequence(batch):
    """{(example, response): (tokens, mask, positions)} read back from any layout."""
    out = {}
    for r in range(batch.tokens.shape[0]):
        for seg in sorted(set(batch.segments[r].tolist()) - {0}):
            where = batch.segments[r] == seg
            e, k = set(batch.example_id[r][where].tolist()), set(batch.response_id[r][where].tolist())
            assert len(e) == 1 and len(k) == 1, "a segment holds exactly one sequence"
            key = (e.pop(), k.pop())
            assert key not in out
            out[key] = (batch.tokens[r][where], batch.loss_mask[r][where], batch.positions[r][where])
    return out


def _fake_logprob_sums(batch):
    """Stand-in per-sequence log-prob sums: token t scored from (t-1, t, position) within its segment."""
    sums = {}
    tokens, seg, pos = batch.tokens, batch.segments, batch.positions
    for r in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            if batch.loss_mask[r, t] and seg[r, t] == seg[r, t - 1]:
                key = (int(batch.example_id[r, t]), int(batch.response_id[r, t]))
                value = math.sin(tokens[r, t] * 0.37 + tokens[r, t - 1] * 0.11 + pos[r, t] * 0.05)
                sums[key] = sums.get(key, 0.0) + value
    return sums


@pytest.mark.parametrize("num_responses", [2, 3])
def test_packing_preserves_every_sequence(num_responses):
    examples = _examples(2, 8, num_responses=num_responses)
    unpacked, _ = build_batch(examples, 8, num_responses, LayoutConfig(max_len=32, buckets=None), PAD)
    layout = LayoutConfig(max_len=32, pack=True, row_length=64, pack_rows=8 * num_responses)
    packed, left_out = build_batch(examples, 8, num_responses, layout, PAD)
    assert left_out == 0 and packed.tokens.shape == (8 * num_responses, 64)
    a, b = _per_sequence(unpacked), _per_sequence(packed)
    assert a.keys() == b.keys() == {(e, k) for e in range(8) for k in range(num_responses)}
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert x.tolist() == y.tolist()
        assert b[key][2].tolist() == list(range(len(b[key][0])))  # positions restart per segment
    sums_a, sums_b = _fake_logprob_sums(unpacked), _fake_logprob_sums(packed)
    assert sums_a.keys() == sums_b.keys()
    for key in sums_a:
        assert sums_a[key] == pytest.approx(sums_b[key])
    # segments are 1, 2, ... contiguous runs in each row, padding only at the end
    for r in range(packed.tokens.shape[0]):
        seg = packed.segments[r]
        used = seg[seg > 0]
        assert used.tolist() == sorted(used.tolist())
        assert set(used.tolist()) == set(range(1, int(used.max(initial=0)) + 1))
        assert (seg[len(used) :] == 0).all()
    # an example's responses share a row when they fit together
    for e, ex in enumerate(examples):
        rows_of_example = np.nonzero((packed.example_id == e).any(axis=1))[0]
        if sum(ex.sequence_length(k) for k in range(num_responses)) <= 64:
            assert len(rows_of_example) == 1, (e, rows_of_example)
    # packing uses fewer rows than the unpacked layout
    used_rows = int((packed.segments > 0).any(axis=1).sum())
    assert used_rows < 8 * num_responses
    assert batch_padding(packed)["real_tokens"] == batch_padding(unpacked)["real_tokens"]


def test_pack_sequences_first_fit_and_spill():
    placements, left = pack_sequences([[3, 3], [5, 4], [2, 2], [2, 1], [1, 1]], row_length=8, num_rows=3)
    where = {(p.example, p.response): (p.row, p.start) for p in placements}
    assert left == []
    assert where[(0, 0)] == (0, 0) and where[(0, 1)] == (0, 3)  # whole in row 0; 2 slots left
    assert where[(1, 0)] == (1, 0) and where[(1, 1)] == (2, 0)  # 9 > 8: spilt one by one
    assert where[(2, 0)] == (2, 4) and where[(2, 1)] == (2, 6)  # first row with room for 4: row 2
    assert where[(3, 0)] == (1, 5) and where[(3, 1)] == (1, 7)  # first row with room for 3: row 1
    assert where[(4, 0)] == (0, 6) and where[(4, 1)] == (0, 7)  # then row 0 is filled
    assert all(p.length == n for p, n in zip(placements, [3, 3, 5, 4, 2, 2, 2, 1, 1, 1]))


def test_pack_overflow_error_and_drop():
    lengths = [[4, 4], [4, 4], [4, 4]]
    with pytest.raises(PackingOverflow, match="raise pack_rows"):
        pack_sequences(lengths, row_length=8, num_rows=2)
    placements, left = pack_sequences(lengths, row_length=8, num_rows=2, overflow="drop")
    assert left == [2] and {p.example for p in placements} == {0, 1}
    examples = _examples(3, 4)
    layout = LayoutConfig(max_len=32, pack=True, row_length=32, pack_rows=2, pack_overflow="drop")
    batch, left_out = build_batch(examples, 4, 2, layout, PAD)
    present = set(batch.example_id[batch.example_id >= 0].tolist())
    assert left_out == 4 - len(present) > 0
    for e in range(4):
        assert (batch.weight[e] == 0) == (e not in present)


def test_padding_stats_accumulate():
    stats = PaddingStats()
    examples = _examples(4, 6)
    layout = LayoutConfig(max_len=32, buckets=8)
    slots = real = 0
    for chunk in (examples[:4], examples[4:]):
        batch, _ = build_batch(chunk, 4, 2, layout, PAD)
        stats.add_batch(batch)
        slots += batch.tokens.size
        real += sum(ex.sequence_length(k) for ex in chunk for k in range(2))
    got = stats.as_dict()
    assert got["batches"] == 2 and got["slots"] == slots and got["real_tokens"] == real
    assert got["filler_examples"] == 2
    assert got["padding_waste"] == pytest.approx(1 - real / slots)


def test_pad_length_keeps_contents():
    batch, _ = build_batch(_examples(5, 2), 2, 2, LayoutConfig(max_len=64, buckets=16), PAD)
    wider = batch.pad_length(64, PAD)
    T = batch.tokens.shape[1]
    assert wider.tokens.shape[1] == 64
    for key in ("tokens", "segments", "loss_mask", "example_id"):
        assert np.array_equal(getattr(wider, key)[:, :T], getattr(batch, key))
    assert (wider.segments[:, T:] == 0).all() and (wider.example_id[:, T:] == -1).all()


def test_layout_config_checks():
    with pytest.raises(ValueError, match="pack_rows"):
        LayoutConfig(max_len=32, pack=True)
    with pytest.raises(ValueError, match="row_length"):
        LayoutConfig(max_len=32, pack=True, pack_rows=2, row_length=16)
    with pytest.raises(ValueError, match="one kind"):
        build_batch(_examples(6, 1) + _examples(7, 1, num_responses=3), 2, 2, LayoutConfig(max_len=64), PAD)
