"""prefjax's side of the comparison: the trainer's jitted step (prefjax.train.steps.train_step), as
benchmarks/train_step.py runs it, on the shared HF folder and pairs.

Run by compare_trl_tunix.py as `python run_prefjax.py JOB.json RESULT.json [--share-prefix]`;
with --share-prefix the pairs go in prefix-shared rows (prefjax.data.prefix_sharing: the
prompt once, then both responses), the trainer's `data.share_prefix=True`.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any

import runner_common


def _batch(job: dict[str, Any]) -> Any:
    """The pipeline's unpacked layout: row k*B + b is response k (0 chosen, 1 rejected) of pair b."""
    import numpy as np

    from prefjax.batch import Batch

    b, seq = job["pairs"], job["seq"]
    p = len(job["prompt"][0])
    tokens = np.zeros((2 * b, seq), np.int32)
    for k, responses in enumerate((job["chosen"], job["rejected"])):
        for i in range(b):
            tokens[k * b + i] = job["prompt"][i] + responses[i]
    loss_mask = np.zeros((2 * b, seq), np.float32)
    loss_mask[:, p:] = 1.0  # every response token is scored, as TRL and Tunix do
    return Batch(tokens=tokens, positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (2 * b, seq)).copy(),
                 segments=np.ones((2 * b, seq), np.int32), loss_mask=loss_mask,
                 example_id=np.tile(np.arange(b, dtype=np.int32), 2)[:, None].repeat(seq, 1),
                 response_id=np.repeat(np.arange(2, dtype=np.int32), b)[:, None].repeat(seq, 1),
                 weight=np.ones(b, np.float32), scores=np.zeros((b, 2), np.float32),
                 margin=np.zeros(b, np.float32), label=np.ones(b, np.float32))


def run(job: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    from prefjax import roles, scoring
    from prefjax.models import hf_checkpoint
    from prefjax.train import loss_inputs, steps
    from prefjax.train.state import TrainState

    overrides = {"dtype": job.get("dtype", "float32")}  # compute dtype; parameters stay float32
    if job.get("attention"):
        overrides["attention_impl"] = job["attention"]
    ckpt = hf_checkpoint.load(job["model_dir"], with_tokenizer=False, **overrides)
    lr = job["lr"]
    tx = optax.adamw(lr, weight_decay=0.0)  # TRL's and Tunix's runs also use no decay
    from prefjax.data import prefix_sharing

    shared = "--share-prefix" in sys.argv[3:]
    spec = steps.StepSpec(loss_name="dpo", loss_hparams=(("beta", job["beta"]),), reference=roles.Reference("frozen"),
                          columns=loss_inputs.Columns())
    trainable = {"model": ckpt.params}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                       loss_state={}, nonfinite_steps=jnp.zeros((), jnp.int32))
    frozen = roles.Fixed(reference=jax.tree.map(jnp.copy, ckpt.params))
    rows = _batch(job)
    if shared:
        rows = prefix_sharing.share_prefixes(rows, multiple=64)
    batch = rows.map(jnp.asarray)
    fn = jax.jit(functools.partial(steps.train_step, spec, scoring.Model(ckpt.cfg, ckpt.graphdef), tx, lambda s: lr),
                 donate_argnums=(0,))
    start = time.perf_counter()
    compiled = fn.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    # XLA's own account of the step program's peak: inputs + outputs + temporaries, minus
    # the outputs that reuse donated inputs' buffers.
    xla_peak = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                         + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    clock = runner_common.StepClock()
    first_logps = None
    for _ in range(job["steps"]):
        clock.begin()
        state, m = compiled(state, frozen, batch)
        clock.end(float(m["loss"]))  # float() waits for the step, like .item() in torch
        if first_logps is None:
            first_logps = float(m["logps/chosen"])  # policy log-prob of the chosen responses, mean over pairs
    out = clock.summary(job["warmup"])
    device = jax.devices()[0]
    out.update(first_logps_chosen=first_logps, compile_seconds=compile_s, xla_peak_bytes=xla_peak,
               version=f"jax {jax.__version__}, {device.device_kind}, attention {ckpt.cfg.attention_impl or 'default'}",
               device_peak_bytes=runner_common.jax_device_peak_bytes(device))
    return out


if __name__ == "__main__":
    runner_common.main(run)
