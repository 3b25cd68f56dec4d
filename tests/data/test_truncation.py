"""prefjax.data.truncation: limits, modes and counters on hand-built tokenized examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prefjax.data.tokenize import TokenizedExample, tokenize_example
from prefjax.data.truncation import TruncationConfig, TruncationCounter, truncate, truncate_example
from prefjax.models.tokenizer import load_tokenizer

BOS = 1000


def _example(prompt_len=10, response_lens=(6, 4), bos=True, first_unscored=0):
    """Prompt [BOS, 1, 2, ...]; response k = 100*(k+1) + t, its first ``first_unscored`` tokens unscored."""
    prompt = np.arange(prompt_len, dtype=np.int32)
    if bos:
        prompt[0] = BOS
    responses = [np.arange(n, dtype=np.int32) + 100 * (k + 1) for k, n in enumerate(response_lens)]
    masks = [np.asarray([0] * first_unscored + [1] * (n - first_unscored), np.int8) for n in response_lens]
    return TokenizedExample(
        kind="pair",
        prompt_ids=prompt,
        response_ids=responses,
        response_masks=masks,
        scores=(1.0, 0.0),
        source="t.jsonl:1",
    )


def test_within_limits_is_unchanged():
    ex = _example()
    out, event = truncate_example(
        ex, TruncationConfig(max_prompt_len=10, max_response_len=6, max_len=16), BOS
    )
    assert out is not None and not event.prompt_truncated and event.responses_truncated == 0
    assert out.prompt_ids.tolist() == ex.prompt_ids.tolist()
    assert [r.tolist() for r in out.response_ids] == [r.tolist() for r in ex.response_ids]


def test_prompt_keep_end_keeps_bos_and_most_recent_tokens():
    ex = _example(prompt_len=10)
    out, event = truncate_example(ex, TruncationConfig(max_prompt_len=5), BOS)
    assert event.prompt_truncated
    assert out.prompt_ids.tolist() == [BOS, 6, 7, 8, 9]  # BOS + the last 4
    out, _ = truncate_example(ex, TruncationConfig(max_prompt_len=5, keep_bos=False), BOS)
    assert out.prompt_ids.tolist() == [5, 6, 7, 8, 9]
    out, _ = truncate_example(_example(bos=False), TruncationConfig(max_prompt_len=5), BOS)
    assert out.prompt_ids.tolist() == [5, 6, 7, 8, 9]


def test_prompt_keep_start_and_drop():
    ex = _example(prompt_len=10)
    out, _ = truncate_example(ex, TruncationConfig(max_prompt_len=4, prompt_mode="keep_start"), BOS)
    assert out.prompt_ids.tolist() == [BOS, 1, 2, 3]
    out, event = truncate_example(ex, TruncationConfig(max_prompt_len=4, prompt_mode="drop"), BOS)
    assert out is None and event.dropped == "prompt_too_long"


def test_response_modes_cut_ids_and_masks_together():
    ex = _example(response_lens=(6, 4), first_unscored=1)
    out, event = truncate_example(ex, TruncationConfig(max_response_len=3), BOS)
    assert event.responses_truncated == 2
    assert out.response_ids[0].tolist() == [100, 101, 102]
    assert out.response_masks[0].tolist() == [0, 1, 1]
    out, _ = truncate_example(ex, TruncationConfig(max_response_len=3, response_mode="keep_end"), BOS)
    assert out.response_ids[0].tolist() == [103, 104, 105] and out.response_masks[0].tolist() == [1, 1, 1]
    assert out.response_ids[1].tolist() == [201, 202, 203]
    out, event = truncate_example(ex, TruncationConfig(max_response_len=5, response_mode="drop"), BOS)
    assert out is None and event.dropped == "response_too_long"


def test_total_length_cuts_responses_to_the_room_left():
    ex = _example(prompt_len=10, response_lens=(6, 4))
    out, event = truncate_example(ex, TruncationConfig(max_len=13), BOS)
    assert [len(r) for r in out.response_ids] == [3, 3]
    assert all(len(out.prompt_ids) + len(r) <= 13 for r in out.response_ids)
    assert event.tokens_removed == (6 - 3) + (4 - 3)
    # prompt first cut to its own limit, then the room is max_len - prompt
    out, _ = truncate_example(ex, TruncationConfig(max_prompt_len=8, max_len=12), BOS)
    assert len(out.prompt_ids) == 8 and [len(r) for r in out.response_ids] == [4, 4]


def test_no_room_or_no_scored_token_drops():
    out, event = truncate_example(_example(prompt_len=10), TruncationConfig(max_len=10), BOS)
    assert out is None and event.dropped == "sequence_too_long"
    ex = _example(response_lens=(6, 4), first_unscored=2)
    out, event = truncate_example(ex, TruncationConfig(max_response_len=2), BOS)
    assert out is None and event.dropped == "no_scored"


def test_counter_counts_and_rates():
    counter = TruncationCounter()
    cfg = TruncationConfig(max_prompt_len=8, max_response_len=5, response_mode="keep_start", max_len=14)
    examples = [
        _example(prompt_len=6, response_lens=(4, 4)),  # untouched
        _example(prompt_len=10, response_lens=(4, 4)),  # prompt cut
        _example(prompt_len=6, response_lens=(7, 4)),  # one response cut
        _example(prompt_len=10, response_lens=(9, 9)),
    ]  # prompt and both responses cut
    kept = [truncate(ex, cfg, BOS, counter) for ex in examples]
    assert all(k is not None for k in kept)
    drop_cfg = TruncationConfig(max_prompt_len=8, prompt_mode="drop")
    assert truncate(_example(prompt_len=10), drop_cfg, BOS, counter) is None
    counts = counter.as_dict()
    assert counts["examples"] == 5
    assert counts["prompt_truncated"] == 2 and counts["response_truncated"] == 3
    assert (
        counts["examples_truncated"] == 3
        and counts["dropped"] == 1
        and counts["dropped_prompt_too_long"] == 1
    )
    assert counts["truncated_rate"] == pytest.approx(3 / 5) and counts["dropped_rate"] == pytest.approx(1 / 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt_mode": "middle"}, "prompt_mode"),
        ({"max_len": 0}, "max_len"),
        ({"max_prompt_len": 10, "max_len": 10}, "below max_len"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TruncationConfig(**kwargs)


def test_keep_end_on_a_real_chat_keeps_the_generation_prompt():
    tok = load_tokenizer(Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "llama")
    turns = [
        {"role": "user", "content": "Hello world!"},
        {"role": "assistant", "content": "I am fine."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    example = {
        "kind": "unpaired",
        "format": "chat",
        "prompt": turns,
        "label": True,
        "source": "c:1",
        "completion": [{"role": "assistant", "content": "Paris."}],
    }
    full = tokenize_example(example, tok)
    out = truncate(full, TruncationConfig(max_prompt_len=12), tok.bos_token_id)
    assert out.prompt_ids[0] == tok.bos_token_id and len(out.prompt_ids) == 12
    assert out.prompt_ids[1:].tolist() == full.prompt_ids[-11:].tolist()
    assert tok.decode(out.prompt_ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
