"""The training loop: run(config, workdir). Rerunning the same command resumes.

Sections, in order: validate -> mesh -> model, reference, optimizer, state ->
data -> restore the latest checkpoint (state and data position) -> loop
(step, metrics one step late, NaN policy, checkpoints, preemption, evals) ->
final checkpoint and Hugging Face export.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from prefjax import (checkpoint, config_lib, data_streams, loss_inputs, metrics as metrics_lib, preemption,
                     reference_cache, sharding, steps, train_setup)
from prefjax.models import hf_checkpoint
from prefjax.models import lora as lora_lib

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN/Inf loss or gradient and the config says to stop."""


def _columns(batch: dict[str, np.ndarray]) -> loss_inputs.Columns:
    """Which optional columns the data has: any finite value among real (weight > 0) examples."""
    live = batch["weight"] > 0
    return loss_inputs.Columns(scores=bool(np.isfinite(batch["scores"][live]).any()),
                               margin=bool(np.isfinite(batch["margin"][live]).any()))


def _batch_shardings(batch: dict[str, jax.Array]) -> dict[str, NamedSharding]:
    return {k: v.sharding for k, v in batch.items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) under `workdir`; returns a summary dict (also written to summary.json)."""
    # ---------------------------------------------------------------- validate, mesh
    config_lib.validate(config)
    workdir_path = Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    chief = jax.process_index() == 0
    if chief:
        (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = None if config.sharding_rules is None else tuple(tuple(r) for r in config.sharding_rules)
    kind = config_lib.data_kind(config.loss_name)

    with sharding.use_mesh(mesh, rules):
        # ------------------------------------------------------------ model and data
        model = train_setup.build_model(config, mesh, rules)
        cfg, tokenizer = model[0], model[3]
        stream = data_streams.make_stream(config, config.data.source, kind=kind, vocab_size=cfg.vocab_size,
                                          tokenizer=tokenizer, train=True)
        first = next(stream)
        columns = _columns(first)
        _check_columns(config, columns)
        setup = train_setup.build(config, mesh, rules, model=model, columns=columns,
                                  num_responses=stream.num_responses, packed=stream.packed,
                                  shared_prefix=stream.shared_prefix)
        del model
        ref_cache = None
        if setup.spec.reference == "precomputed":
            ref_cache = reference_cache.prepare(config, setup, workdir_path, mesh, rules, kind=kind)

        # ------------------------------------------------------------ restore
        ckpt = checkpoint.Checkpointer(str(workdir_path / "checkpoints"), keep=config.checkpoint.keep,
                                       save_every=config.checkpoint.every, async_save=config.checkpoint.async_save)
        state = setup.state
        start = 0
        latest = ckpt.latest_step()
        if latest is not None:
            abstract = train_setup.abstract_state(setup, state)
            state, meta = ckpt.restore(latest, abstract, data_iterator=stream.grain_iterator)
            stream.restore(meta.get("data", {}))
            start = latest
            logger.info("resumed from %s at step %d", ckpt.directory, start)
            first = None  # the restored stream position decides the next batch
        writer = metrics_lib.MetricsWriter(str(workdir_path), enabled=chief)
        writer.truncate_after(start)

        # ------------------------------------------------------------ loop
        summary = _loop(config, setup, stream, first, state, start, ckpt, writer, mesh, rules, ref_cache,
                        tokenizer, workdir_path)
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    if chief:
        (workdir_path / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _check_columns(config: ml_collections.ConfigDict, columns: loss_inputs.Columns) -> None:
    from prefjax.losses import registry  # pylint: disable=import-outside-toplevel

    needs = registry.get(config.loss_name).requires
    if ("score_chosen" in needs or "score_rejected" in needs) and not columns.scores:
        raise config_lib.ConfigError(f"loss {config.loss_name!r} needs per-response scores, but the data "
                                     f"({config.data.source!r}) has no score columns")


def _loop(config, setup, stream, first, state, start, ckpt, writer, mesh, rules, ref_cache, tokenizer,
          workdir_path) -> dict[str, Any]:
    total = config.total_steps
    spec = setup.spec
    late = metrics_lib.OneStepLate()
    progress = metrics_lib.ProgressBar(total, start) if jax.process_index() == 0 else None
    peak, peak_source = _peak_flops(config)
    step_fn = None
    last_time = time.perf_counter()
    skipped = 0
    history: dict[str, float] = {}
    evals: dict[str, float] = {}

    def handle(fetched: Optional[tuple[int, dict[str, float]]], seconds: float, tokens: float, computed: float,
               seq_len: int):
        nonlocal skipped
        if fetched is None:
            return
        step, values = fetched
        if values.get("nonfinite", 0.0) > 0:
            skipped += 1
            message = (f"step {step}: the loss or gradient is not finite (loss={values.get('loss')}, "
                       f"grad_norm={values.get('grad_norm')}); the update was not applied")
            if config.on_nonfinite == "stop":
                ckpt.wait_until_finished()
                latest = ckpt.latest_step()
                raise NonFiniteLossError(f"{message}. The last checkpoint (step {latest}) is intact; "
                                         "set --config.on_nonfinite=skip to skip such batches")
            logger.warning("%s; skipping the batch (%d skipped so far)", message, skipped)
        # FLOPs of what the step computes (padding included); tokens/s counts real tokens.
        flops = metrics_lib.preference_step_flops(setup.model_cfg, computed, seq_len,
                                                  reference_forward=spec.reference in ("frozen", "lora"))
        seconds = max(seconds, 1e-9)
        values = {k: float(v) for k, v in values.items()}
        values.update(step_seconds=seconds, tokens_per_second=tokens / seconds,
                      mfu=metrics_lib.mfu(flops, seconds, jax.device_count(), peak), skipped_steps=skipped)
        history.update(values)
        if step % config.log_every == 0 or step == total:
            writer.write(step, values)
        if progress is not None:
            progress.update(step, values)

    watcher = preemption.PreemptionWatcher()
    with watcher:
        for step in range(start, total):
            local = first if first is not None else next(stream)
            first = None
            if ref_cache is not None:
                local = ref_cache.attach(local)
            batch = data_streams.to_global(stream, local, mesh, rules)
            if step_fn is None:
                step_fn = steps.jit_train_step(spec, setup.model_cfg, setup.graphdef, setup.tx, setup.schedule,
                                               setup.state_shardings, setup.frozen_shardings,
                                               _batch_shardings(batch), setup.replicated)
            state, device_metrics = step_fn(state, setup.frozen, batch)
            now = time.perf_counter()
            tokens = float(np.sum(local["segments"] > 0)) * jax.process_count()
            computed = float(local["tokens"].size) * jax.process_count()
            seq_len = local["tokens"].shape[1]
            handle(late.push(step + 1, device_metrics), now - last_time, tokens, computed, seq_len)
            last_time = now
            done = step + 1
            data_state = {"data": stream.state()}
            if ckpt.should_save(done) and done < total:
                ckpt.save(done, state, data_iterator=stream.grain_iterator,
                          metadata=dict(data_state, config=json.loads(config.to_json_best_effort())))
            if watcher.requested(done):
                handle(late.flush(), time.perf_counter() - last_time, tokens, computed, seq_len)
                ckpt.save(done, state, data_iterator=stream.grain_iterator,
                          metadata=dict(data_state, config=json.loads(config.to_json_best_effort())), force=True)
                ckpt.close()
                writer.close()
                logger.warning("preempted (%s): saved step %d; rerun the same command to resume",
                               watcher.reason(), done)
                return dict(step=done, preempted=True, **_final(history))
            if config.eval_every and done % config.eval_every == 0 and config.data.eval_source:
                evals = _evaluate(config, setup, state, mesh, rules, tokenizer, writer, done)
        if total > start:
            handle(late.flush(), time.perf_counter() - last_time, tokens, computed, seq_len)
    ckpt.save(total, state, data_iterator=stream.grain_iterator,
              metadata=dict(data=stream.state(), config=json.loads(config.to_json_best_effort())), force=True)
    if config.data.eval_source:
        evals = _evaluate(config, setup, state, mesh, rules, tokenizer, writer, total)
    ckpt.close()
    writer.close()
    exported = _export(config, setup, state, workdir_path) if config.checkpoint.export_hf else None
    return dict(step=total, preempted=False, skipped_steps=skipped, exported=exported,
                peak_flops=peak, peak_flops_source=peak_source, **_final(history), **evals)


def _final(history: dict[str, float]) -> dict[str, float]:
    return {f"final/{k}": float(v) for k, v in history.items() if isinstance(v, (int, float))}


def _peak_flops(config: ml_collections.ConfigDict) -> tuple[float, str]:
    if config.peak_flops:
        return float(config.peak_flops), "config"
    return metrics_lib.device_peak_flops()


_EVAL_STEPS: dict[int, Any] = {}  # id(setup) -> its jitted eval step, compiled once per run


def _evaluate(config, setup, state, mesh, rules, tokenizer, writer, step) -> dict[str, float]:
    """Held-out loss and the loss's metrics (reward accuracy, margins, log-probs), weighted means."""
    kind = config_lib.data_kind(config.loss_name)
    stream = data_streams.make_stream(config, config.data.eval_source, kind=kind,
                                      vocab_size=setup.model_cfg.vocab_size, tokenizer=tokenizer, train=False)
    eval_fn = _EVAL_STEPS.get(id(setup))
    totals: dict[str, float] = {}
    for i, local in enumerate(stream):
        if i >= config.eval_batches:
            break
        if setup.spec.reference == "precomputed":
            break  # held-out data has no cached reference log-probs; see reference_cache
        batch = data_streams.to_global(stream, local, mesh, rules)
        if eval_fn is None:
            eval_fn = steps.jit_eval_step(setup.spec, setup.model_cfg, setup.graphdef, setup.state_shardings,
                                          setup.frozen_shardings, _batch_shardings(batch), setup.replicated)
            _EVAL_STEPS.clear()  # one run at a time: drop an earlier run's program
            _EVAL_STEPS[id(setup)] = eval_fn
        sums = jax.device_get(eval_fn(state, setup.frozen, batch))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    close = getattr(stream, "close", None)
    if close is not None:
        close()
    count = max(totals.pop("examples", 0.0), 1e-9)
    totals.pop("tokens", None)
    results = {f"eval/{k}": v / count for k, v in totals.items()}
    if results:
        writer.write(step, results)
    return results


def _export(config, setup, state, workdir_path: Path) -> Optional[str]:
    """The trained policy as a Hugging Face folder (LoRA: merged weights plus the adapters alone)."""
    folder = workdir_path / "hf_export"
    copy_from = config.model.hf_folder or config.data.tokenizer or None
    dtype = config.checkpoint.export_dtype or None
    if setup.spec.lora is not None:
        merged = lora_lib.merge(setup.frozen, state.params["adapters"], setup.spec.lora)
        hf_checkpoint.save(folder, setup.model_cfg, merged, copy_from=copy_from, dtype=dtype)
        if jax.process_index() == 0:
            lora_lib.export_peft(jax.device_get(state.params["adapters"]), setup.spec.lora, setup.model_cfg,
                                 str(workdir_path / "hf_adapters"),
                                 base_model_name_or_path=config.model.hf_folder or config.model.preset)
    else:
        hf_checkpoint.save(folder, setup.model_cfg, state.params["model"], copy_from=copy_from, dtype=dtype)
    return str(folder)
