"""Held-out evaluation during and after training: the loss and its metrics on `data.eval_source`.

    evaluator = Evaluator(config, setup, mesh, rules)          # compiles its step on first use
    results = evaluator.evaluate(state, step, writer)          # {"eval/loss": ..., "eval/rewards/accuracies": ...}

Each evaluation reads at most `eval_batches` batches of the held-out data (one pass)
and reports weighted means: held-out loss, reward accuracy, margins, log-probs, as
the loss's own metrics name them. With a precomputed reference the held-out data's
reference log-probs come from their own cache (prefjax.train.reference_cache),
computed before training with the other.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import ml_collections
from jax.sharding import Mesh

from prefjax.data import streams
from prefjax.train import config_lib, reference_cache, steps
from prefjax.train import metrics as metrics_lib
from prefjax.train.state import TrainState


class Evaluator:
    """Evaluates train states on the config's held-out data (module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, setup: Any, mesh: Mesh, rules: Any,
                 cache: Optional[reference_cache.ReferenceCache] = None):
        if setup.spec.reference.kind == "precomputed" and cache is None:
            raise ValueError("evaluation with a precomputed reference needs the held-out data's reference cache "
                             "(prefjax.train.reference_cache.prepare(..., train=False))")
        self.config, self.setup, self.mesh, self.rules = config, setup, mesh, rules
        self.cache = cache
        self._step = None

    def _source(self) -> Any:
        config, setup = self.config, self.setup
        source = streams.make_stream(config, config.data.eval_source, kind=config_lib.data_kind(config.loss_name, config.reward.num_labels),
                                     vocab_size=setup.model_cfg.vocab_size, tokenizer=setup.tokenizer, train=False)
        if self.cache is not None:
            source = reference_cache.attach_to(source, self.cache)
        return source

    def check_data(self) -> None:
        """Reads the first held-out batch: data that can give none raises PipelineEmptyError here, at
        start-up, rather than at the first evaluation."""
        source = self._source()
        try:
            next(iter(source), None)
        finally:
            source.close()

    def evaluate(self, state: TrainState, step: int, writer: metrics_lib.MetricsWriter) -> dict[str, float]:
        """Weighted means over the held-out batches, written to `writer` at `step` and returned."""
        setup = self.setup
        source = self._source()
        totals: dict[str, float] = {}
        try:
            for i, local in enumerate(source):
                if i >= self.config.eval_batches:
                    break
                batch = local.to_global(self.mesh, self.rules, source.pad_id)
                if self._step is None:
                    self._step = steps.jit_eval_step(setup.spec, setup.model, setup.state_shardings,
                                                     setup.fixed_shardings, jax.tree.map(lambda x: x.sharding, batch),
                                                     setup.replicated)
                sums = jax.device_get(self._step(state, setup.fixed, batch))
                for k, v in sums.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
        finally:
            source.close()
        count = max(totals.pop("examples", 0.0), 1e-9)
        totals.pop("tokens", None)
        results = {f"eval/{k}": v / count for k, v in totals.items()}
        if results:
            writer.write(step, results)
        return results
