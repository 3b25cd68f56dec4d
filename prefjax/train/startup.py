"""The start-up report: what a run is about to do, printed and written before its first step.

    report = startup.collect(config, mesh=mesh, setup=setup, source=source, state=state,
                             first=first_batch, start=start, notes=resume_notes)
    print(startup.render(report))                    # ~10 lines
    startup.write(workdir, report)                   # <workdir>/summary.json {"startup": report}

It says, in numbers: the data (source, kind and row format, rows read and what loading
skipped, token lengths and what truncation would do on a bounded sample, padding waste of
the first batch), the model (parameters, trainable ones), the devices and mesh, the loss
and its resolved hyperparameters, the reference kind, and the steps (a fresh run or the
step it resumes from). Written at start, so a run that crashes later still has it; the
end-of-run summary keeps it under the same key.

Token lengths come from the first SAMPLE_EXAMPLES examples of the source, tokenized once
more here: enough for percentiles, cheap on a dataset of any size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from prefjax.batch import Batch
from prefjax.data import inspect, packing, streams
from prefjax.data import pipeline as pipeline_lib
from prefjax.data.truncation import DROP_REASONS
from prefjax.models import params as params_lib
from prefjax.train import config_lib, optim

SAMPLE_EXAMPLES = 1000
SUMMARY_FILE = "summary.json"
PERCENTILES = (50, 90, 99)


def _innermost(source: Any) -> Any:
    """The stream under mapped streams (prefix sharing, cached reference log-probs)."""
    for _ in range(16):  # a bound, not a limit anyone reaches: mapped streams nest once or twice
        inner = getattr(source, "inner", None)
        if inner is None:
            break
        source = inner
    return source


def find_pipeline(source: Any) -> Optional[pipeline_lib.Pipeline]:
    """The data pipeline under a batch source, or None (synthetic data, a source given to train.run)."""
    pipe = getattr(_innermost(source), "pipeline", None)
    return pipe if isinstance(pipe, pipeline_lib.Pipeline) else None


def _lengths(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    array = np.asarray(values)
    out = {f"p{q}": int(np.percentile(array, q, method="higher")) for q in PERCENTILES}
    out["max"] = int(array.max())
    return out


def sample_lengths(pipe: pipeline_lib.Pipeline, limit: int = SAMPLE_EXAMPLES) -> dict[str, Any]:
    """Token lengths of the source's first `limit` examples (before truncation), what the
    pipeline's truncation does to them and the padding their batches would hold, as the data
    inspector (prefjax.data.inspect) computes them."""
    count = min(limit, pipe.num_examples)
    examples = [pipe.source[index] for index in range(count)]
    try:
        found = inspect.inspect_examples(examples, pipe.tokenizer, pipe.config, show=0)
    except packing.PackingOverflow as err:  # the pipeline raises it too, on its first such batch
        return dict(examples=count, packing_overflow=str(err))
    trunc = found.truncation
    return dict(examples=count, prompt_tokens=_lengths(found.prompt_lengths.tolist()),
                sequence_tokens=_lengths(found.sequence_lengths.tolist()),
                truncated=int(trunc["examples_truncated"]),
                dropped={r: int(trunc[f"dropped_{r}"]) for r in DROP_REASONS if trunc[f"dropped_{r}"]},
                errors=len(found.errors), padding_waste=float(found.padding["padding_waste"]))


def _data(config: ml_collections.ConfigDict, source: Any, first: Optional[Batch]) -> dict[str, Any]:
    data = config.data
    kind = config_lib.data_kind(config.loss_name, config.reward.num_labels)
    report: dict[str, Any] = dict(source=data.source, split=data.split, kind=kind,
                                  format=data.format, batch_size=data.batch_size, max_len=data.max_len,
                                  grad_accum=config.grad_accum, eval_source=data.eval_source,
                                  eval_split=data.eval_split)
    pipe = find_pipeline(source)
    if pipe is not None:
        report["examples"] = pipe.num_examples
        loaded = getattr(source, "load_summary", None) or pipeline_lib.load_summary(pipe.source)
        if loaded is not None:
            report["load"] = loaded.as_dict() if hasattr(loaded, "as_dict") else dict(loaded)
        # The row format the rows were read as (records.LoadSummary.row_format), when the source says.
        detected = getattr(loaded, "row_format", None) or getattr(pipe.source, "row_format", None)
        if detected:
            report["format_detected"] = str(detected)
        report["sample"] = sample_lengths(pipe)
    elif isinstance(_innermost(source), streams.SyntheticStream):
        report["synthetic"] = dict(length=data.max_len, pool=data.synthetic_pool)
    else:
        report["given_source"] = type(_innermost(source)).__name__  # a batch source given to train.run
    if first is not None:
        counts = packing.batch_padding(first)
        report["first_batch"] = dict(rows=int(first.tokens.shape[0]), length=int(first.tokens.shape[1]),
                                     layout=first.layout, real_examples=counts["real_examples"],
                                     tokens_per_step=int(first.tokens.size) * jax.process_count(),
                                     padding_waste=(counts["pad_tokens"] + counts["filler_tokens"])
                                     / max(counts["slots"], 1))
    return report


def collect(config: ml_collections.ConfigDict, *, workdir: Path, mesh: Mesh, setup: Any, source: Any,
            state: Any, first: Optional[Batch], start: int, notes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The report as a JSON-able dict (module docstring)."""
    trainable = int(params_lib.count(state.params))
    extra = sum(int(params_lib.count(v)) for k, v in state.params.items() if k != "model")  # adapters, reward head
    device = jax.devices()[0]
    return dict(
        data=_data(config, source, first),
        workdir=str(workdir),
        model=dict(name=config.model.hf_folder or config.model.preset, family=setup.model_cfg.family,
                   parameters=int(params_lib.count(setup.initial_params)) + extra,
                   trainable=trainable, param_dtype=config.model.param_dtype, lora=bool(config.lora.enabled)),
        devices=dict(count=jax.device_count(), processes=jax.process_count(), platform=device.platform,
                     kind=str(device.device_kind), mesh={str(k): int(v) for k, v in mesh.shape.items()}),
        loss=dict(name=config.loss_name, hparams={k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in config_lib.loss_hparams(config)},
                  reward_head=list(setup.reward_labels or config_lib.reward_labels(config))
                  if setup.spec.policy.reward_head else None),
        reference=dict(kind=setup.spec.reference.kind, dtype=config.reference.dtype or config.model.param_dtype,
                       refresh=config.reference.refresh),
        optimizer=dict(name=config.optimizer.name, learning_rate=config.optimizer.learning_rate,
                       schedule=config.optimizer.schedule,
                       warmup_steps=optim.resolve_warmup_steps(config.optimizer.warmup_steps, config.total_steps)),
        steps=dict(start=start, total=config.total_steps, resumed=start > 0, notes=list(notes)),
    )


def _si(n: float) -> str:
    for factor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g}{suffix}"
    return f"{n:g}"


def _percentiles(lengths: dict[str, int]) -> str:
    return " ".join(f"{k} {v}" for k, v in lengths.items()) if lengths else "-"


def _data_lines(data: dict[str, Any]) -> list[str]:
    fmt = data["format"] + (f" -> {data['format_detected']}" if "format_detected" in data else "")
    split = f" split {data['split']}" if _has_splits(data["source"]) else ""
    head = f"data: {data['source']}{split} ({data['kind']} examples, format {fmt})"
    if "given_source" in data:
        head = f"data: a {data['given_source']} given to train.run ({data['kind']} examples)"
    lines = []
    if "examples" in data:
        load = data.get("load") or {}
        skipped = load.get("skipped") or {}
        filtered = load.get("filtered") or {}
        head += f": {data['examples']} examples"
        if "rows" in load:
            head += f" from {load['rows']} rows"
        if skipped:
            head += ", skipped " + ", ".join(f"{r}={n}" for r, n in sorted(skipped.items()))
        if filtered:
            head += ", filtered " + ", ".join(f"{r}={n}" for r, n in sorted(filtered.items()))
        sample = data["sample"]
        if "packing_overflow" in sample:
            lines.append(f"  first {sample['examples']} examples: {sample['packing_overflow']}")
        else:
            lines.append(f"  lengths (tokens, first {sample['examples']} examples): prompt "
                         f"{_percentiles(sample['prompt_tokens'])} | sequence "
                         f"{_percentiles(sample['sequence_tokens'])}")
            dropped = ", ".join(f"{r}={n}" for r, n in sorted(sample["dropped"].items())) or "none"
            lines.append(f"  at max_len {data['max_len']}: {sample['truncated']} truncated, dropped {dropped}"
                         + (f", {sample['errors']} not tokenizable" if sample["errors"] else ""))
    elif "synthetic" in data:
        head += f": random tokens, rows of {data['synthetic']['length']}"
    batch = data.get("first_batch")
    if batch is not None:
        micro = f" in {data['grad_accum']} micro-batches" if data["grad_accum"] > 1 else ""
        lines.append(f"  batch: {data['batch_size']} examples{micro}, {batch['layout']} rows {batch['rows']} x "
                     f"{batch['length']} per process, {batch['tokens_per_step']} tokens per step, padding waste "
                     f"{100 * batch['padding_waste']:.1f}% (first batch)")
    if data["eval_source"]:
        lines.append(f"  eval data: {data['eval_source']}" + (f" (split {data['eval_split']})"
                                                               if _has_splits(data["eval_source"]) else ""))
    return [head] + lines


def _has_splits(source: str) -> bool:
    """Whether a data source spec names a dataset with splits (Hub or TFDS), not files."""
    return source.startswith(("hf:", "tfds:")) or Path(source, "dataset_info.json").is_file()


def render(report: dict[str, Any]) -> str:
    """The printed block (about ten lines)."""
    model, devices, loss = report["model"], report["devices"], report["loss"]
    ref, opt, steps = report["reference"], report["optimizer"], report["steps"]
    share = 100.0 * model["trainable"] / max(model["parameters"], 1)
    mesh = " ".join(f"{k}={v}" for k, v in devices["mesh"].items())
    hparams = " ".join(f"{k}={v}" for k, v in loss["hparams"].items())
    lines = [
        (f"prefjax train: {loss['name']} on {devices['count']} {devices['platform']} device(s) ({devices['kind']}), "
         f"{devices['processes']} process(es), mesh {mesh}"),
        (f"  model: {model['name']} ({model['family']}), {_si(model['parameters'])} parameters, "
         f"{_si(model['trainable'])} trainable ({share:.1f}%{', LoRA' if model['lora'] else ''}), "
         f"{model['param_dtype']}"),
        f"  loss: {loss['name']} {hparams}".rstrip() + f"; reference {ref['kind']}"
        + (f" ({ref['dtype']}, refresh {ref['refresh']})" if ref["kind"] != "none" else "")
        + (f"; reward head {len(loss['reward_head'])} output(s) {loss['reward_head']}" if loss.get("reward_head")
           else ""),
        f"  optimizer: {opt['name']} lr {opt['learning_rate']:g}, {opt['schedule']}, warmup {opt['warmup_steps']}",
    ]
    lines += ["  " + line if i == 0 else line for i, line in enumerate(_data_lines(report["data"]))]
    run = (f"resumed from step {steps['start']}" if steps["resumed"] else "fresh run") + f", to step {steps['total']}"
    lines.append(f"  steps: {run}; workdir {report['workdir']}")
    lines += [f"  note: {note}" for note in steps["notes"]]
    return "\n".join(lines)


def write(workdir: Path, report: dict[str, Any]) -> None:
    """<workdir>/summary.json as {"startup": report}: the end-of-run summary replaces it, keeping
    this section."""
    (Path(workdir) / SUMMARY_FILE).write_text(json.dumps({"startup": report}, indent=2, sort_keys=True) + "\n")
