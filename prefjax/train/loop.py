"""The training loop: run(config, workdir). Rerunning the same command resumes.

    validate -> mesh -> model, roles, optimizer, state (prefjax.train.setup)
             -> batch source (dataset stream, with cached reference log-probs when precomputed)
             -> restore the latest checkpoint (state and data position)
             -> loop: step, metrics one step late, NaN policy, checkpoints, preemption, evals
             -> final checkpoint, evaluation and Hugging Face export

Everything the loop needs travels in one `Run` value; the per-step bookkeeping
(FLOPs, MFU, NaN policy, logging) is a `StepReporter`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from prefjax import roles, sharding
from prefjax.batch import Batch
from prefjax.data import streams
from prefjax.losses import registry
from prefjax.train import (
    checkpoint,
    config_lib,
    evaluation,
    export,
    loss_inputs,
    preemption,
    reference_cache,
    steps,
)
from prefjax.train import metrics as metrics_lib
from prefjax.train import setup as setup_lib
from prefjax.train.batch_source import BatchSource
from prefjax.train.state import TrainState

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN/Inf loss or gradient and the config says to stop."""


@dataclasses.dataclass
class Run:
    """One training run: its config, where it runs, what it trains, where its batches come from."""

    config: ml_collections.ConfigDict
    workdir: Path
    mesh: Mesh
    rules: Any
    setup: setup_lib.Setup
    source: BatchSource
    state: TrainState
    start: int  # steps already done (0, or the restored checkpoint's)
    first: Optional[Batch]  # the batch read to inspect the data, used by the first step of a fresh run
    ckpt: checkpoint.Checkpointer
    writer: metrics_lib.MetricsWriter
    evaluator: Optional[evaluation.Evaluator]

    def metadata(self) -> dict[str, Any]:
        """The checkpoint's metadata: the data position and the config."""
        return dict(data=self.source.state(), config=json.loads(self.config.to_json_best_effort()))

    def save(self, step: int, force: bool = False) -> None:
        if force or self.ckpt.should_save(step):
            self.ckpt.save(step, self.state, data_iterator=self.source.data_iterator, metadata=self.metadata(),
                           force=force)


def run(config: ml_collections.ConfigDict, workdir: str, *, source: Optional[BatchSource] = None) -> dict[str, Any]:
    """Trains (or resumes) under `workdir`; returns a summary dict (also written to summary.json).

    `source` replaces the dataset stream of `config.data.source` (any BatchSource: e.g. an
    online sampler); its position is checkpointed like the stream's.
    """
    config_lib.validate(config)
    workdir_path = Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    chief = jax.process_index() == 0
    if chief:
        (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = None if config.sharding_rules is None else tuple(tuple(r) for r in config.sharding_rules)
    with sharding.use_mesh(mesh, rules):
        current = _start(config, workdir_path, mesh, rules, source)
        try:
            summary = _train(current)
        finally:
            current.source.close()
    if chief:
        (workdir_path / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _start(config: ml_collections.ConfigDict, workdir: Path, mesh: Mesh, rules: Any,
           source: Optional[BatchSource]) -> Run:
    """Model, data, roles, state; the latest checkpoint restored when there is one."""
    kind = config_lib.data_kind(config.loss_name)
    model = setup_lib.build_model(config, mesh, rules)
    cfg, tokenizer = model[0], model[3]
    if source is not None and setup_lib.reference_role(config).kind == "precomputed":
        raise config_lib.ConfigError("reference.kind='precomputed' computes its cache from data.source; a run "
                                     "given its own batch source needs a reference that runs in the step")
    if source is None:
        source = streams.make_stream(config, config.data.source, kind=kind, vocab_size=cfg.vocab_size,
                                     tokenizer=tokenizer, train=True)
    first = next(source)
    columns = loss_inputs.Columns.present_in(first)
    _check_columns(config, columns)
    setup = setup_lib.build(config, mesh, rules, model=model, columns=columns)
    del model
    eval_cache = None
    if setup.spec.reference.kind == "precomputed":
        cache = reference_cache.prepare(config, setup, workdir, mesh, rules, kind=kind)
        source, first = reference_cache.attach_to(source, cache), cache.attach(first)
        if config.data.eval_source:
            eval_cache = reference_cache.prepare(config, setup, workdir, mesh, rules, kind=kind, train=False)
    evaluator = None
    if config.data.eval_source:
        evaluator = evaluation.Evaluator(config, setup, mesh, rules, cache=eval_cache)

    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=config.checkpoint.keep,
                                   save_every=config.checkpoint.every, async_save=config.checkpoint.async_save)
    state, start = setup.state, 0
    latest = ckpt.latest_step()
    if latest is not None:
        abstract = setup_lib.abstract_state(setup, state)
        state, meta = ckpt.restore(latest, abstract, data_iterator=source.data_iterator)
        source.restore(meta.get("data", {}))
        start = latest
        logger.info("resumed from %s at step %d", ckpt.directory, start)
        first = None  # the restored stream position decides the next batch
    writer = metrics_lib.MetricsWriter(str(workdir), enabled=jax.process_index() == 0)
    writer.truncate_after(start)
    return Run(config, workdir, mesh, rules, setup, source, state, start, first, ckpt, writer, evaluator)


def _check_columns(config: ml_collections.ConfigDict, columns: loss_inputs.Columns) -> None:
    needs = registry.get(config.loss_name).requires
    if ("score_chosen" in needs or "score_rejected" in needs) and not columns.scores:
        raise config_lib.ConfigError(f"loss {config.loss_name!r} needs per-response scores, but the data "
                                     f"({config.data.source!r}) has no score columns")


class StepReporter:
    """Turns each step's fetched metrics into the logged record: applies the NaN policy, adds
    step time, tokens/s and MFU, writes metrics.jsonl / TensorBoard and the progress line."""

    def __init__(self, current: Run):
        config, spec = current.config, current.setup.spec
        self.run = current
        self.peak, self.peak_source = _peak_flops(config)
        self.progress = metrics_lib.ProgressBar(config.total_steps, current.start) if jax.process_index() == 0 \
            else None
        # MFU counts the reference's forward only when the step runs it for the loss to read.
        self.reference_forward = spec.reference.runs_in_step and roles.reads_reference(spec.loss)
        self.skipped = 0
        self.history: dict[str, float] = {}

    def report(self, fetched: Optional[tuple[int, dict[str, float]]], seconds: float, batch: Batch) -> None:
        """`fetched` is OneStepLate's (step, host metrics) or None; `batch` the local batch it ran on."""
        if fetched is None:
            return
        config = self.run.config
        step, values = fetched
        if values.get("nonfinite", 0.0) > 0:
            self.skipped += 1
            message = (f"step {step}: the loss or gradient is not finite (loss={values.get('loss')}, "
                       f"grad_norm={values.get('grad_norm')}); the update was not applied")
            if config.on_nonfinite == "stop":
                self.run.ckpt.wait_until_finished()
                latest = self.run.ckpt.latest_step()
                raise NonFiniteLossError(f"{message}. The last checkpoint (step {latest}) is intact; "
                                         "set --config.on_nonfinite=skip to skip such batches")
            logger.warning("%s; skipping the batch (%d skipped so far)", message, self.skipped)
        # FLOPs of what the step computes (padding included); tokens/s counts real tokens.
        processes = jax.process_count()
        tokens = float(np.sum(batch.segments > 0)) * processes
        computed = float(batch.tokens.size) * processes
        flops = metrics_lib.preference_step_flops(self.run.setup.model_cfg, computed, batch.length,
                                                  reference_forward=self.reference_forward)
        seconds = max(seconds, 1e-9)
        values = {k: float(v) for k, v in values.items()}
        values.update(step_seconds=seconds, tokens_per_second=tokens / seconds,
                      mfu=metrics_lib.mfu(flops, seconds, jax.device_count(), self.peak), skipped_steps=self.skipped)
        self.history.update(values)
        if step % config.log_every == 0 or step == config.total_steps:
            self.run.writer.write(step, values)
        if self.progress is not None:
            self.progress.update(step, values)

    def final(self) -> dict[str, float]:
        return {f"final/{k}": float(v) for k, v in self.history.items() if isinstance(v, (int, float))}


def _train(current: Run) -> dict[str, Any]:
    """The loop itself, then the final checkpoint, evaluation and export; the run's summary."""
    config, setup = current.config, current.setup
    total = config.total_steps
    reporter = StepReporter(current)
    late = metrics_lib.OneStepLate()
    step_fn = None
    evals: dict[str, float] = {}
    last_time = time.perf_counter()
    local = None
    watcher = preemption.PreemptionWatcher()
    with watcher:
        for step in range(current.start, total):
            local = current.first if current.first is not None else next(current.source)
            current.first = None
            batch = local.to_global(current.mesh, current.rules, current.source.pad_id)
            if step_fn is None:
                step_fn = steps.jit_train_step(setup.spec, setup.model, setup.tx, setup.schedule,
                                               setup.state_shardings, setup.fixed_shardings,
                                               jax.tree.map(lambda x: x.sharding, batch), setup.replicated)
            current.state, device_metrics = step_fn(current.state, setup.fixed, batch)
            now = time.perf_counter()
            reporter.report(late.push(step + 1, device_metrics), now - last_time, local)
            last_time = now
            done = step + 1
            if done < total:
                current.save(done)
            if watcher.requested(done):
                reporter.report(late.flush(), time.perf_counter() - last_time, local)
                current.save(done, force=True)
                current.ckpt.close()
                current.writer.close()
                logger.warning("preempted (%s): saved step %d; rerun the same command to resume",
                               watcher.reason(), done)
                return dict(step=done, preempted=True, **reporter.final())
            if current.evaluator is not None and config.eval_every and done % config.eval_every == 0:
                evals = current.evaluator.evaluate(current.state, done, current.writer)
        if local is not None:
            reporter.report(late.flush(), time.perf_counter() - last_time, local)
    current.save(total, force=True)
    if current.evaluator is not None:
        evals = current.evaluator.evaluate(current.state, total, current.writer)
    current.ckpt.close()
    current.writer.close()
    exported = export.export_policy(config, setup, current.state, current.workdir) \
        if config.checkpoint.export_hf else None
    return dict(step=total, preempted=False, skipped_steps=reporter.skipped, exported=exported,
                peak_flops=reporter.peak, peak_flops_source=reporter.peak_source, **reporter.final(), **evals)


def _peak_flops(config: ml_collections.ConfigDict) -> tuple[float, str]:
    if config.peak_flops:
        return float(config.peak_flops), "config"
    return metrics_lib.device_peak_flops()
