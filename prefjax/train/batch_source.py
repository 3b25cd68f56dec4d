"""What the training loop reads batches from.

    for step in range(start, total):
        batch = next(source).to_global(mesh, rules, source.pad_id)
        ...
        ckpt.save(step, state, data_iterator=source.data_iterator, metadata={"data": source.state()})

A batch source yields this process's slice of each global batch (a numpy
prefjax.batch.Batch) and keeps its position resumable: either in a grain iterator
that the checkpoint saves (`data_iterator`), or in the JSON dict `state()` that goes
into the checkpoint's metadata and comes back through `restore`. Implementations:

- the dataset streams (prefjax.data.streams): the grain pipeline over files or TFDS
  data, prefix-shared rows, synthetic random rows;
- `prefjax.train.reference_cache.attach_to(source, cache)`: another source's batches
  with the precomputed reference's log-probs attached.

An online sampler that makes batches from the live policy is a third kind: the loop
does not change.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Protocol, runtime_checkable

from prefjax.batch import Batch


@runtime_checkable
class BatchSource(Protocol):
    """The loop's view of where batches come from (module docstring)."""

    num_responses: int  # responses per example (K)
    pad_id: int  # the token multi-process assembly pads rows with
    data_iterator: Optional[Any]  # a grain iterator the checkpoint saves, or None

    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def state(self) -> dict[str, Any]:
        """The position not held by `data_iterator`, as JSON (checkpoint metadata)."""

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()` of a saved run."""

    def close(self) -> None:
        """Release threads and files."""
