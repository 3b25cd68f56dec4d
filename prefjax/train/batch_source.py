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

A source that samples from the live policy (prefjax.online.source.OnlineSource) is a
third kind, a `LivePolicySource`: the loop hands it the run's pieces once (`bind`) and
the current train state before every batch (`observe`), so that it samples from the
parameters the last step produced, on the same mesh, without a copy. Its columns are
known without reading a batch, and it may bring the reference's log-probs itself.
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


@runtime_checkable
class LivePolicySource(BatchSource, Protocol):
    """A BatchSource whose batches depend on the policy being trained (module docstring)."""

    provides_reference_logps: bool  # its batches carry ref_logps (reference.kind="precomputed" in the step)

    def columns(self) -> Any:
        """The optional data columns its batches have (prefjax.train.loss_inputs.Columns)."""

    def bind(self, setup: Any, mesh: Any, rules: Any) -> None:
        """The run's model, roles and fixed weights (prefjax.train.setup.Setup) and its mesh, before the
        first batch (and before a restore's `restore`)."""

    def observe(self, state: Any) -> None:
        """The train state the next batch is sampled from."""

    def pop_metrics(self) -> dict[str, float]:
        """What it measured since the last call (mean reward, KL, ...), logged with the step."""
