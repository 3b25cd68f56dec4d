"""The training loop: run(config, workdir). Rerunning the same command resumes.

    validate -> a checkpoint's config checked against this one (prefjax.train.resume)
             -> mesh -> model, roles, optimizer, state (prefjax.train.setup)
             -> batch source (dataset stream, with cached reference log-probs when precomputed)
             -> restore the latest checkpoint (state and data position)
             -> start-up report, printed and written to summary.json (prefjax.train.startup)
             -> loop: step, metrics one step late, NaN policy, checkpoints, preemption, evals
             -> final checkpoint, evaluation and Hugging Face export

Everything the loop needs travels in one `Run` value; the per-step bookkeeping
(FLOPs, MFU, NaN policy, logging) is a `StepReporter`.

The train step is compiled ahead of time, once per batch shape (`CompiledStep`), and its
compile time is reported apart ("compiled train step in 2.3 s", summary key
compile_seconds); step time, tokens/s and MFU exclude it, and checkpoint saves and
evaluations too (prefjax.train.metrics.StepTimer).

Data that ends before total_steps (a finite data.num_epochs) stops the run with
DataExhaustedError; data with nothing to train on stops it at start-up with
prefjax.data.pipeline.PipelineEmptyError (never a hang).

Faults (README, "Reliability"): the newest checkpoint that fails its checks is moved aside and
the previous one restored (prefjax.train.checkpoint.Checkpointer.restore_latest); a background
save that failed stops the run at the next step; a run that stops on an error still writes
summary.json (the step it reached, its last metrics, the error); on_nonfinite="skip" stops
after nonfinite_max_consecutive skipped steps in a row or more than nonfinite_max_fraction of
total_steps, counted in the train state so that a resume keeps the count; rerunning a finished
run leaves its summary.json as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from prefjax import roles, sharding
from prefjax.batch import Batch
from prefjax.data import pipeline as pipeline_lib
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
    resume,
    reward_stats,
    startup,
    steps,
    workdir_lock,
)
from prefjax.train import metrics as metrics_lib
from prefjax.train import setup as setup_lib
from prefjax.train.batch_source import BatchSource, LivePolicySource
from prefjax.train.state import TrainState

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN/Inf loss or gradient and the config says to stop."""


class DataExhaustedError(config_lib.ConfigError):
    """The training data ended before total_steps (a finite data.num_epochs)."""


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
    report: dict[str, Any] = dataclasses.field(default_factory=dict)  # the start-up report
    restored: dict[str, Any] = dataclasses.field(default_factory=dict)  # the restored checkpoint's metadata
    done: int = 0  # steps finished so far (what a failure's summary reports)
    lock: Optional[workdir_lock.WorkdirLock] = None  # process 0's hold on the workdir

    def metadata(self, final: Optional[dict[str, float]] = None) -> dict[str, Any]:
        """The checkpoint's metadata: the data position, the config and, at the end, the final metrics
        (so that rerunning a finished run still reports them)."""
        meta = dict(data=self.source.state(), config=json.loads(self.config.to_json_best_effort()))
        if final:
            meta["final_metrics"] = final
        return meta

    def save(self, step: int, force: bool = False, final: Optional[dict[str, float]] = None) -> None:
        if force or self.ckpt.should_save(step):
            if self.lock is not None:
                self.lock.check()  # another run took the workdir over: do not write its checkpoints
            self.ckpt.save(step, self.state, data_iterator=self.source.data_iterator,
                           metadata=self.metadata(final), force=force)


def run(config: ml_collections.ConfigDict, workdir: str, *, source: Optional[BatchSource] = None) -> dict[str, Any]:
    """Trains (or resumes) under `workdir`; returns a summary dict (also written to summary.json,
    whose "startup" section is written before the first step).

    `source` replaces the dataset stream of `config.data.source` (any BatchSource: e.g. an
    online sampler); its position is checkpointed like the stream's.
    """
    config_lib.validate(config)
    workdir_path = Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    # One run per workdir: held (by process 0) from before any checkpoint is opened until the end.
    with workdir_lock.run_lock(workdir_path, config.workdir_lock) as lock:
        return _run_locked(config, workdir_path, source, lock)


def _run_locked(config: ml_collections.ConfigDict, workdir_path: Path, source: Optional[BatchSource],
                lock: Optional[workdir_lock.WorkdirLock]) -> dict[str, Any]:
    """run()'s work while the workdir is locked (`lock`: None on processes other than 0, or when
    workdir_lock.enabled is False)."""
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = None if config.sharding_rules is None else tuple(tuple(r) for r in config.sharding_rules)
    with sharding.use_mesh(mesh, rules):
        current = _start(config, workdir_path, mesh, rules, source)
        current.lock = lock
        try:
            summary = _train(current)
        finally:
            current.source.close()
    if not summary.get(_KEPT):
        _write_summary(current, summary)
    summary.pop(_KEPT, None)
    return summary


_KEPT = "_kept"  # marks a finished run's summary.json that a rerun left as it was


def _write_summary(current: Run, summary: dict[str, Any]) -> None:
    """Adds the data counts and the start-up report to `summary` and writes summary.json (process 0)."""
    pipe = startup.find_pipeline(current.source)
    if pipe is not None:
        summary["data"] = pipe.stats()  # this process's counts over the run: truncated, dropped, padding
    summary["startup"] = current.report
    if jax.process_index() == 0:
        (current.workdir / startup.SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def _previous_summary(workdir: Path) -> Optional[dict[str, Any]]:
    """summary.json of a run that finished (its final metrics), or None."""
    try:
        previous = json.loads((workdir / startup.SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    finished = isinstance(previous, dict) and not previous.get("preempted") and "error" not in previous
    return previous if finished and "final/loss" in previous else None


def _start(config: ml_collections.ConfigDict, workdir: Path, mesh: Mesh, rules: Any,
           source: Optional[BatchSource]) -> Run:
    """Model, data, roles, state; the latest checkpoint restored when there is one. What it
    opened is closed again when it fails (a refused config, data with nothing to train on)."""
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=config.checkpoint.keep,
                                   save_every=config.checkpoint.every, async_save=config.checkpoint.async_save,
                                   verify=config.checkpoint.verify)
    opened: list[Any] = [ckpt]
    try:
        return _open(config, workdir, mesh, rules, source, ckpt, opened)
    except BaseException:
        for thing in reversed(opened):
            thing.close()
        raise


def _open(config: ml_collections.ConfigDict, workdir: Path, mesh: Mesh, rules: Any, source: Optional[BatchSource],
          ckpt: checkpoint.Checkpointer, opened: list[Any]) -> Run:
    """_start's work; everything it opens is appended to `opened`."""
    chief = jax.process_index() == 0
    newest = ckpt.latest_metadata()  # a newer checkpoint whose metadata is unreadable is moved aside
    latest = None if newest is None else newest[0]
    notes: list[str] = []
    if newest is not None:  # checked before anything is built: a refused rerun fails at once
        old = newest[1].get("config")
        if old:
            notes = resume.check_config(old, config, latest, where=str(ckpt.directory))
    if chief:
        resume.archive_config(workdir, config, latest or 0)
    kind = config_lib.data_kind(config.loss_name, config.reward.num_labels)
    model = setup_lib.build_model(config, mesh, rules)
    cfg, tokenizer = model.cfg, model.tokenizer
    live = isinstance(source, LivePolicySource)
    brings_reference = live and source.provides_reference_logps
    if source is not None and setup_lib.reference_role(config).kind == "precomputed" and not brings_reference:
        raise config_lib.ConfigError("reference.kind='precomputed' computes its cache from data.source; a run "
                                     "given its own batch source needs a reference that runs in the step")
    label = f"data.source={config.data.source!r}" if source is None else f"the {type(source).__name__}"
    first = None
    with _naming_the_source(label):
        if source is None:
            source = streams.make_stream(config, config.data.source, kind=kind, vocab_size=cfg.vocab_size,
                                         tokenizer=tokenizer, train=True)
        opened.append(source)
        if not live:  # a live source's first batch needs the policy: it is sampled in the loop
            first = _next_batch(source, config, current_step=latest or 0)
    columns = source.columns() if live else loss_inputs.Columns.present_in(first)
    _check_columns(config, columns, source.num_responses)
    setup = setup_lib.build(config, mesh, rules, model=model, columns=columns)
    del model
    if live:
        source.bind(setup, mesh, rules)
    if setup.spec.policy.reward_head:
        # rated data without reward.labels: the attribute names the data has (e.g. HelpSteer2's five)
        found = getattr(source, "rating_labels", None) if kind == "rated" and not config.reward.labels else None
        setup.reward_labels = tuple(found) if found else config_lib.reward_labels(config)
        if config.checkpoint.export_hf:
            setup.reward_pad_id = export.reward_pad_id(config, setup, source.pad_id, workdir)
    eval_cache = None
    if setup.spec.reference.kind == "precomputed" and not brings_reference:
        cache = reference_cache.prepare(config, setup, workdir, mesh, rules, kind=kind)
        source, first = reference_cache.attach_to(source, cache), cache.attach(first)
        if config.data.eval_source:
            eval_cache = reference_cache.prepare(config, setup, workdir, mesh, rules, kind=kind, train=False)
    evaluator = None
    if config.data.eval_source:
        evaluator = evaluation.Evaluator(config, setup, mesh, rules, cache=eval_cache)
        with _naming_the_source(f"data.eval_source={config.data.eval_source!r}"):
            evaluator.check_data()  # held-out data that yields nothing fails now, not after training

    state, start, inspected, meta = setup.state, 0, first, {}
    if latest is not None:
        restored = ckpt.restore_latest(setup_lib.abstract_state(setup, state), data_iterator=source.data_iterator,
                                       accept=_config_checker(config, latest, str(ckpt.directory)))
        if restored is None:
            raise checkpoint.CheckpointDamagedError(
                f"{ckpt.directory}: every checkpoint is damaged (moved to {ckpt.directory}-damaged, see the "
                "warnings above); rerun to start from step 0, or copy an intact one back")
        state, meta, start = restored.state, restored.metadata, restored.step
        notes += list(restored.notes)
        source.restore(meta.get("data", {}))
        logger.info("resumed from %s at step %d", ckpt.directory, start)
        first = None  # the restored stream position decides the next batch
    writer = metrics_lib.MetricsWriter(str(workdir), enabled=chief)
    writer.truncate_after(start)  # metrics.jsonl and TensorBoard forget the steps this run redoes
    report = startup.collect(config, workdir=workdir, mesh=mesh, setup=setup, source=source, state=state,
                             first=inspected, start=start, notes=tuple(notes))
    if chief and start < config.total_steps:  # a finished run's summary.json is left as it is
        print(startup.render(report), flush=True)
        startup.write(workdir, report)
    return Run(config, workdir, mesh, rules, setup, source, state, start, first, ckpt, writer, evaluator, report,
               restored=meta, done=start)


def _config_checker(config: ml_collections.ConfigDict, checked: int, where: str) -> Any:
    """restore_latest's `accept`: an older checkpoint it falls back to has its config checked too."""
    def accept(step: int, meta: dict[str, Any]) -> None:
        if step != checked and meta.get("config"):
            resume.check_config(meta["config"], config, step, where=where)
    return accept


@contextlib.contextmanager
def _naming_the_source(label: str) -> Iterator[None]:
    """PipelineEmptyError raised while opening the data, with the data's name in front."""
    try:
        yield
    except pipeline_lib.PipelineEmptyError as err:
        raise pipeline_lib.PipelineEmptyError(f"{label}: {err}", err.counts) from None


def _next_batch(source: BatchSource, config: ml_collections.ConfigDict, current_step: int) -> Batch:
    """The source's next batch; a source that has ended is DataExhaustedError, not StopIteration."""
    try:
        return next(source)
    except StopIteration:
        pipe = startup.find_pipeline(source)
        per_pass = ""
        if pipe is not None and pipe.batches_per_process is not None:
            count = pipe.batches_per_process
            per_pass = f" ({count} batch{'es' if count != 1 else ''} for data.num_epochs={config.data.num_epochs})"
        raise DataExhaustedError(
            f"data.source={config.data.source!r} has no batch left for step {current_step + 1} of "
            f"total_steps={config.total_steps}{per_pass}: set data.num_epochs=None to repeat the data, or "
            f"total_steps={current_step}") from None


# Fields only online batches fill (prefjax.online), with the online algorithm that runs the loss.
_ONLINE_FIELDS = {"prev_chosen": ("sampler_logps", "inpo"), "chosen_from_reference": ("origin", "xpo"),
                  "sample": ("num_responses", "hypo"), "score": ("scores", "nash_md")}


def _check_columns(config: ml_collections.ConfigDict, columns: loss_inputs.Columns,
                   num_responses: Optional[int] = None) -> None:
    needs = registry.get(config.loss_name).requires
    if ("score_chosen" in needs or "score_rejected" in needs) and not columns.scores:
        raise config_lib.ConfigError(f"loss {config.loss_name!r} needs per-response scores, but the data "
                                     f"({config.data.source!r}) has no score columns")
    for field, (column, algorithm) in _ONLINE_FIELDS.items():
        present = num_responses == 3 if column == "num_responses" else getattr(columns, column)
        if field in needs and not present:
            raise config_lib.ConfigError(
                f"loss {config.loss_name!r} reads {field!r}, which online batches carry (samples drawn from the "
                f"policy as it trains): run it with job='online' and online.algorithm={algorithm!r} "
                "(configs/online.py)")


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
        # Skipped steps are counted in the train state, so the count (and its limit) survives a resume.
        self.skipped = int(np.asarray(current.state.nonfinite_steps.addressable_data(0)))
        self.consecutive = 0
        self.allowed = max(1, int(config.nonfinite_max_fraction * config.total_steps))
        self.history: dict[str, float] = {}

    def report(self, fetched: Optional[tuple[int, dict[str, float]]], seconds: float, batch: Batch) -> None:
        """`fetched` is OneStepLate's (step, host metrics) or None; `batch` the local batch it ran on."""
        if fetched is None:
            return
        config = self.run.config
        step, values = fetched
        if values.get("nonfinite", 0.0) > 0:
            self.skipped += 1
            self.consecutive += 1
            what = "the updated weights or optimizer state are" if values.get("nonfinite_update", 0.0) > 0 \
                else "the loss or gradient is"
            message = (f"step {step}: {what} not finite (loss={values.get('loss')}, "
                       f"grad_norm={values.get('grad_norm')}); the update was not applied")
            if config.on_nonfinite == "stop":
                raise NonFiniteLossError(f"{message}. {self._last_checkpoint()}; "
                                         "set --config.on_nonfinite=skip to skip such batches")
            if self.consecutive >= config.nonfinite_max_consecutive:
                raise NonFiniteLossError(
                    f"{message}; {self.consecutive} steps in a row were skipped "
                    f"(nonfinite_max_consecutive={config.nonfinite_max_consecutive}). {self._last_checkpoint()}")
            if self.skipped > self.allowed:
                raise NonFiniteLossError(
                    f"{message}; {self.skipped} of total_steps={config.total_steps} steps skipped, more than "
                    f"nonfinite_max_fraction={config.nonfinite_max_fraction} allows ({self.allowed}). "
                    f"{self._last_checkpoint()}")
            logger.warning("%s; skipping the batch (%d skipped so far)", message, self.skipped)
        else:
            self.consecutive = 0
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

    def _last_checkpoint(self) -> str:
        """Where a rerun would resume: skipped updates never reach the state, so it holds no NaN."""
        self.run.ckpt.wait_until_finished()
        latest = self.run.ckpt.latest_step()
        return "No checkpoint was saved yet" if latest is None else \
            f"The last checkpoint (step {latest}) holds no non-finite values"

    def compiled(self, seconds: float, batch: Batch, programs: int) -> None:
        """Says (once per program) how long compiling the train step took; the progress line's
        s/step and ETA leave it out too."""
        if self.progress is not None:
            self.progress.exclude(seconds)
        if jax.process_index() != 0:
            return
        if programs == 1:
            print(f"compiled train step in {seconds:.1f} s", flush=True)
        else:
            print(f"compiled train step for {batch.layout} rows {batch.tokens.shape[0]} x {batch.length} in "
                  f"{seconds:.1f} s ({programs} programs)", flush=True)

    def final(self) -> dict[str, float]:
        return {f"final/{k}": float(v) for k, v in self.history.items() if isinstance(v, (int, float))}


class CompiledStep:
    """The jitted train step compiled ahead of time (lower + compile), one program per batch
    shape, so that compiling is timed apart from stepping: a step never waits for a compile."""

    def __init__(self, jitted: Any):
        self.jitted = jitted
        self.programs: dict[Any, Any] = {}
        self.seconds = 0.0

    @staticmethod
    def _key(batch: Batch) -> Any:
        leaves, treedef = jax.tree.flatten(batch)
        return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)

    def ready(self, batch: Batch) -> bool:
        return self._key(batch) in self.programs

    def compile(self, state: TrainState, fixed: Any, batch: Batch) -> float:
        """Compiles the program for `batch`'s shapes; returns the seconds it took."""
        begin = time.perf_counter()
        self.programs[self._key(batch)] = self.jitted.lower(state, fixed, batch).compile()
        seconds = time.perf_counter() - begin
        self.seconds += seconds
        return seconds

    def __call__(self, state: TrainState, fixed: Any, batch: Batch) -> tuple[TrainState, Any]:
        return self.programs[self._key(batch)](state, fixed, batch)


def _train(current: Run) -> dict[str, Any]:
    """The loop itself, then the final checkpoint, evaluation and export; the run's summary. A run
    that fails on the way (a failed save, NaN limits, data that ends) still writes summary.json,
    with what it knows and the error."""
    reporter = StepReporter(current)
    try:
        return _train_steps(current, reporter)
    except Exception as err:
        _write_summary(current, dict(step=current.done, preempted=False, error=f"{type(err).__name__}: {err}",
                                     skipped_steps=reporter.skipped, **reporter.final()))
        raise


def _train_steps(current: Run, reporter: StepReporter) -> dict[str, Any]:
    """_train's work."""
    config, setup = current.config, current.setup
    total = config.total_steps
    if current.start >= total:
        finished = _finished(current)
        if finished is not None:
            return finished
    late = metrics_lib.OneStepLate()
    timer = metrics_lib.StepTimer()
    step_fn: Optional[CompiledStep] = None
    held: dict[int, Batch] = {}  # each dispatched step's local batch, until its metrics are reported
    live = isinstance(current.source, LivePolicySource)
    sampled: dict[int, dict[str, float]] = {}  # a live source's measurements for each dispatched step

    def report(fetched: Optional[tuple[int, dict[str, float]]]) -> None:
        if fetched is not None:  # lap now: the step's metrics have just reached the host
            step_done = fetched[0]
            values = {**fetched[1], **sampled.pop(step_done, {})}
            reporter.report((step_done, values), timer.lap(), held.pop(step_done))

    def compile_stats() -> dict[str, Any]:
        return dict(compile_seconds=step_fn.seconds if step_fn else 0.0,
                    compiled_programs=len(step_fn.programs) if step_fn else 0)

    evals: dict[str, float] = {}
    watcher = preemption.PreemptionWatcher()
    with watcher:
        for step in range(current.start, total):
            if live:
                current.source.observe(current.state)  # samples come from the policy this step updates
            local = current.first if current.first is not None else _next_batch(current.source, config, step)
            current.first = None
            if live:
                sampled[step + 1] = current.source.pop_metrics()
            batch = local.to_global(current.mesh, current.rules, current.source.pad_id)
            if step_fn is None:
                step_fn = CompiledStep(steps.jit_train_step(setup.spec, setup.model, setup.tx, setup.schedule,
                                                            setup.state_shardings, setup.fixed_shardings,
                                                            jax.tree.map(lambda x: x.sharding, batch),
                                                            setup.replicated))
            if not step_fn.ready(batch):
                with timer.excluded(late.wait):
                    seconds = step_fn.compile(current.state, setup.fixed, batch)
                reporter.compiled(seconds, local, len(step_fn.programs))
            current.state, device_metrics = step_fn(current.state, setup.fixed, batch)
            held[step + 1] = local
            report(late.push(step + 1, device_metrics))
            done = current.done = step + 1
            current.ckpt.check_for_errors()  # a failed background save stops the run now, not at the next save
            if done < total and current.ckpt.should_save(done):
                with timer.excluded(late.wait):
                    current.save(done)
            if watcher.requested(done):
                report(late.flush())
                current.save(done, force=True)
                current.ckpt.close()
                current.writer.close()
                logger.warning("preempted (%s): saved step %d; rerun the same command to resume",
                               watcher.reason(), done)
                return dict(step=done, preempted=True, **compile_stats(), **reporter.final())
            if current.evaluator is not None and config.eval_every and done % config.eval_every == 0:
                with timer.excluded(late.wait):
                    evals = current.evaluator.evaluate(current.state, done, current.writer)
        report(late.flush())
    # A resumed run that had nothing left to train reports what its last checkpoint recorded.
    final = reporter.final() or dict(current.restored.get("final_metrics") or {})
    current.save(total, force=True, final=final)
    if current.evaluator is not None:
        evals = current.evaluator.evaluate(current.state, total, current.writer)
    current.ckpt.close()
    current.writer.close()
    exported = None
    if config.checkpoint.export_hf:
        normalization = None
        if setup.spec.policy.reward_head and config.reward.normalize:
            normalization = reward_stats.compute(config, setup, current.state, current.mesh, current.rules)
        exported = export.export_policy(config, setup, current.state, current.workdir, pad_id=setup.reward_pad_id,
                                        reward_normalization=normalization)
    return dict(step=total, preempted=False, skipped_steps=reporter.skipped, exported=exported,
                peak_flops=reporter.peak, peak_flops_source=reporter.peak_source, **compile_stats(),
                **final, **evals)


def _finished(current: Run) -> Optional[dict[str, Any]]:
    """A rerun of a run that already finished: its summary.json is kept as it is (final metrics
    included) and nothing is redone. None when that summary is missing or incomplete: then the
    end of the run (evaluation, export, summary) is done again, with the final metrics the last
    checkpoint recorded."""
    previous = _previous_summary(current.workdir)
    if previous is None:
        return None
    current.ckpt.close()
    current.writer.close()
    if jax.process_index() == 0:
        print(f"{current.workdir}: this run already finished at step {current.start} (total_steps="
              f"{current.config.total_steps}); summary.json kept. Raise total_steps to train further.", flush=True)
    return {**previous, _KEPT: True}


def _peak_flops(config: ml_collections.ConfigDict) -> tuple[float, str]:
    if config.peak_flops:
        return float(config.peak_flops), "config"
    return metrics_lib.device_peak_flops()
