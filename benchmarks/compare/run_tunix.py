"""Tunix's side of the comparison: tunix.sft.dpo.DPOTrainer (JAX) on the shared HF folder and pairs.

Run in the Tunix venv by compare_trl_tunix.py as `python run_tunix.py JOB.json RESULT.json`.
The model is Tunix's own Llama3 class, loaded from the same safetensors with its loader;
the pairs go in as TrainingInput (already tokenised; no padding, so masks are all ones).
Tunix runs the reference forward in its input preparation (a separate jit) and the policy
step in its jitted train step, with asynchronous dispatch (up to 2 steps in flight).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import runner_common


def _model_config(model_dir: str) -> Any:
    from tunix.models.llama3 import model as llama

    hf = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    if hf.get("rope_scaling"):
        raise ValueError(f"{model_dir}/config.json: rope_scaling is not mapped to Tunix's Llama3 config")
    return llama.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=hf.get("rope_theta", 10_000.0),
        norm_eps=hf["rms_norm_eps"], weight_tying=hf.get("tie_word_embeddings", False))


def run(job: dict[str, Any]) -> dict[str, Any]:
    import jax
    import numpy as np
    import optax
    from tunix.models.llama3 import params as llama_params
    from tunix.sft import hooks, peft_trainer
    from tunix.sft.dpo import dpo_trainer

    clock = runner_common.StepClock()
    losses: dict[int, float] = {}

    class Hooks(hooks.TrainingHooks):
        # Steps are timed start to start: with asynchronous dispatch that is the loop's throughput.
        def on_train_start(self, ctx): pass
        def on_eval_step_start(self, ctx): pass
        def on_eval_step_end(self, ctx, eval_loss): pass

        def on_train_step_start(self, ctx):
            now = time.perf_counter()
            if clock._t0:
                clock.times.append(now - clock._t0)
                if clock.first_step_done_at is None:
                    clock.first_step_done_at = time.time()
            clock._t0 = now

        def on_train_step_end(self, ctx, train_step, train_loss):
            losses[int(train_step)] = float(np.asarray(train_loss))  # reported one step late, by Tunix's design

        def on_train_end(self, ctx):
            clock.times.append(time.perf_counter() - clock._t0)
            if clock.first_step_done_at is None:
                clock.first_step_done_at = time.time()

    cfg = _model_config(job["model_dir"])
    # Tunix constrains shardings by axis name, which needs Auto (not Explicit) mesh axes.
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    ones = lambda rows: np.ones((len(rows), len(rows[0])), np.int32)  # noqa: E731
    example = dpo_trainer.TrainingInput(
        prompt_ids=np.asarray(job["prompt"], np.int32), prompt_mask=ones(job["prompt"]),
        chosen_ids=np.asarray(job["chosen"], np.int32), chosen_mask=ones(job["chosen"]),
        rejected_ids=np.asarray(job["rejected"], np.int32), rejected_mask=ones(job["rejected"]))
    # Tunix's Llama has one dtype for parameters and compute: bfloat16 means bf16 parameters
    # (and optimizer updates on them), not mixed precision.
    dtype = None if job.get("dtype", "float32") == "float32" else getattr(jax.numpy, job["dtype"])
    with mesh, tempfile.TemporaryDirectory() as tmp:
        policy = llama_params.create_model_from_safe_tensors(job["model_dir"], cfg, mesh, dtype=dtype)
        reference = llama_params.create_model_from_safe_tensors(job["model_dir"], cfg, mesh, dtype=dtype)
        config = dpo_trainer.DPOTrainingConfig(
            beta=job["beta"], eval_every_n_steps=10**9, max_steps=job["steps"], pbar_description=None,
            metrics_logging_options=peft_trainer.MetricsLoggerOptions(log_dir=tmp, flush_every_n_steps=10**9))
        trainer = dpo_trainer.DPOTrainer(policy, reference, optax.adamw(job["lr"], weight_decay=0.0), config)
        trainer.with_training_hooks(Hooks())
        # Tunix's own log-prob function on its prepared inputs, before any update: the first-step
        # policy log-prob of the chosen responses (mean over pairs), for the cross-framework check.
        prepared = trainer._prepare_inputs(example)
        chosen, _ = dpo_trainer.compute_logps(policy, prepared.input_ids, prepared.positions,
                                              prepared.attention_mask, prepared.logits_to_keep,
                                              prepared.completion_mask)
        first_logps = float(np.mean(np.asarray(chosen)))
        trainer.train([example] * (job["steps"] + 1))
    out = clock.summary(job["warmup"])
    out["losses"] = [losses[k] for k in sorted(losses)]
    out["first_logps_chosen"] = first_logps
    import tunix  # noqa: F401 (version only)
    from importlib.metadata import version
    out.update(version=f"tunix {version('google-tunix')}, jax {jax.__version__}",
               device_peak_bytes=runner_common.jax_device_peak_bytes(jax.devices()[0]))
    return out


if __name__ == "__main__":
    runner_common.main(run)
