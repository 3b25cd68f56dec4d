"""Preference train-step speed and memory per model size, reference strategy and accumulation.

    python benchmarks/train_step.py                      # the README table (CPU, ~3 min)
    python benchmarks/train_step.py --models tiny --steps 2 --batch 4 --length 32   # smoke

For each model, each reference strategy (frozen: the reference forward runs in the
step; precomputed: its log-probs come with the batch; none: a reference-free loss,
SimPO) and each gradient-accumulation setting, it compiles the jitted step
(prefjax.train.steps.train_step, the trainer's own), runs it and prints: median step time,
tokens/s (real tokens), MFU (model FLOPs of policy forward+backward plus the reference
forward, over the device's peak: datasheet on TPU/GPU, a measured matmul rate on
CPU), and the step program's peak memory from XLA's memory analysis (arguments +
outputs + temporaries - donated aliases).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prefjax import models, roles, scoring
from prefjax.data import synthetic_batches
from prefjax.train import loss_inputs, metrics, steps
from prefjax.train.state import TrainState

MODELS = {
    "tiny": models.get_preset("llama2-tiny"),
    "small": models.get_preset("llama2-tiny", hidden_size=256, intermediate_size=768, num_layers=4,
                               num_heads=8, num_kv_heads=4, head_dim=32, vocab_size=4096),
    "medium": models.get_preset("llama2-tiny", hidden_size=512, intermediate_size=1536, num_layers=6,
                                num_heads=8, num_kv_heads=4, head_dim=64, vocab_size=8192),
}
STRATEGIES = {"frozen": ("dpo", "frozen"), "precomputed": ("dpo", "precomputed"), "none": ("simpo", "none")}


def _bench(cfg, strategy: str, accum: int, batch_size: int, length: int, n_steps: int, peak: float) -> dict:
    loss_name, reference = STRATEGIES[strategy]
    graphdef, params = models.init_params(cfg, seed=0)
    tx = optax.adamw(1e-4)
    spec = steps.StepSpec(loss_name=loss_name, loss_hparams=(), reference=roles.Reference(reference),
                          grad_accum=accum, columns=loss_inputs.Columns())
    trainable = {"model": params}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                       loss_state={}, nonfinite_steps=jnp.zeros((), jnp.int32))
    frozen = roles.Fixed(reference=jax.tree.map(jnp.copy, params) if reference == "frozen" else None)
    local = synthetic_batches.random_batch(batch_size, 2, length, cfg.vocab_size, seed=0, fill=1.0)
    if reference == "precomputed":
        local = local.replace(ref_logps=np.full((batch_size, 2), -50.0, np.float32))
    batch = local.map(jnp.asarray)
    fn = jax.jit(functools.partial(steps.train_step, spec, scoring.Model(cfg, graphdef), tx, lambda s: 1e-4),
                 donate_argnums=(0,))
    start = time.perf_counter()
    compiled = fn.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    peak_bytes = None
    if mem is not None:
        peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                      - mem.alias_size_in_bytes)
    state, m = compiled(state, frozen, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        state, m = compiled(state, frozen, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    real_tokens = float(np.sum(local.segments > 0))
    flops = metrics.preference_step_flops(cfg, local.tokens.size, length, reference_forward=reference == "frozen")
    return dict(params=models.count(params), compile=compile_s, seconds=seconds, tokens=real_tokens / seconds,
                mfu=metrics.mfu(flops, seconds, 1, peak), memory=peak_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--accum", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    peak, source = metrics.device_peak_flops(dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
          f"{args.batch} pairs x {args.length} tokens per step; peak {peak / 1e9:.1f} GFLOP/s ({source}); "
          f"median of {args.steps} steps")
    print("| model | params | reference | accum | compile (s) | step (ms) | tokens/s | MFU | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for strategy in args.strategies:
            for accum in args.accum:
                if args.batch % accum:
                    continue
                r = _bench(MODELS[name], strategy, accum, args.batch, args.length, args.steps, peak)
                memory = "-" if r["memory"] is None else f"{r['memory'] / 2**20:.1f}"
                print(f"| {name} | {r['params']:,} | {strategy} | {accum} | {r['compile']:.2f} | "
                      f"{1e3 * r['seconds']:.1f} | {r['tokens']:,.0f} | {100 * r['mfu']:.1f}% | {memory} |")


if __name__ == "__main__":
    main()
