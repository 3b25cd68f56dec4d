"""Random batches in the data pipeline's layout, for tests, benchmarks and smoke runs.

The same prefjax.batch.Batch, dtypes and unpacked row order as prefjax.data.batching
produces (row k * B + b = response k of example b): each sequence is a random prompt
followed by a random response, right-padded; the loss mask covers the response.
"""

from __future__ import annotations

import numpy as np

from prefjax.batch import Batch


def random_batch(batch_size: int, num_responses: int, length: int, vocab_size: int, *, seed: int = 0,
                 min_prompt: int = 2, kind: str = "pair", fill: float = 1.0,
                 num_scores: int | None = None) -> Batch:
    """A numpy Batch of `batch_size` examples with `num_responses` responses each.

    fill: fraction of the row (at most) a sequence occupies, so some rows end in padding.
    Unpaired batches get alternating labels; ranked ones random scores. num_scores: the
    width of `scores` (rated batches: L ratings for their one response; default K).
    """
    rng = np.random.default_rng(seed)
    rows = batch_size * num_responses
    tokens = np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), np.float32)
    segments = np.zeros((rows, length), np.int32)
    max_len = max(min_prompt + 2, int(length * fill))
    prompts = [rng.integers(1, vocab_size, rng.integers(min_prompt, max(min_prompt + 1, max_len // 2)))
               for _ in range(batch_size)]
    for k in range(num_responses):
        for b in range(batch_size):
            row = k * batch_size + b
            prompt = prompts[b]
            n = int(rng.integers(1, max(2, max_len - len(prompt))))
            seq = np.concatenate([prompt, rng.integers(1, vocab_size, n)])[:length]
            tokens[row, :len(seq)] = seq
            segments[row, :len(seq)] = 1
            loss_mask[row, len(prompt):len(seq)] = 1.0
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    example_id = np.where(segments > 0, np.tile(np.arange(batch_size), num_responses)[:, None], -1).astype(np.int32)
    response_id = np.where(segments > 0, np.repeat(np.arange(num_responses), batch_size)[:, None], -1).astype(np.int32)
    scores = rng.normal(size=(batch_size, num_scores or num_responses)).astype(np.float32)
    label = (np.arange(batch_size) % 2 == 0).astype(np.float32) if kind == "unpaired" else np.ones(batch_size, np.float32)
    return Batch(tokens=tokens, positions=positions, segments=segments, loss_mask=loss_mask, example_id=example_id,
                 response_id=response_id, weight=np.ones(batch_size, np.float32), scores=scores,
                 margin=np.abs(rng.normal(size=batch_size)).astype(np.float32), label=label,
                 num_responses=num_responses)
