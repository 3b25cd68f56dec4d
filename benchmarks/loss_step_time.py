"""Time of every registered loss's jitted forward + backward, as a table.

    python benchmarks/loss_step_time.py [--batch 4096] [--repeats 50]

A loss runs on per-example sequence log-probs, so its cost should be noise
next to the model's forward and backward; this prints how much noise, per loss
(median over repeats, after compilation), so a regression shows up as an
outlier row. Inputs come from `prefjax.data.synthetic_logps` (the same generator
the registry-wide tests use). It prints a table and asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from prefjax import losses
from prefjax.data import synthetic_logps as synthetic


def _objective(spec: losses.LossSpec, inputs, state):
    """sum of losses as a function of the policy-side fields."""

    def fn(policy):
        replaced = dataclasses.replace(inputs, **policy)
        out = spec(replaced, state) if spec.stateful else spec(replaced)
        return jnp.sum(out.losses)

    return fn


def time_loss(spec: losses.LossSpec, batch: int, repeats: int) -> tuple[float, float]:
    """(compile seconds, median microseconds per forward+backward call)."""
    inputs = synthetic.make_inputs(spec, batch=batch, seed=0)
    state = synthetic.initial_state(spec)
    policy = {n: getattr(inputs, n) for n in synthetic.POLICY_FIELDS[spec.inputs] if getattr(inputs, n) is not None}
    step = jax.jit(jax.value_and_grad(_objective(spec, inputs, state)))
    start = time.perf_counter()
    jax.block_until_ready(step(policy))
    compile_s = time.perf_counter() - start
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(policy))
        samples.append(time.perf_counter() - start)
    return compile_s, statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch}; median of {args.repeats}")
    print(f"| {'loss':<24} | {'data':<22} | {'compile (s)':>11} | {'fwd+bwd (us)':>12} | {'ns/example':>10} |")
    print(f"|{'-' * 26}|{'-' * 24}|{'-' * 13}|{'-' * 14}|{'-' * 12}|")
    for name in losses.names():
        spec = losses.get(name)
        compile_s, micros = time_loss(spec, args.batch, args.repeats)
        print(
            f"| {name:<24} | {spec.data_shape:<22} | {compile_s:>11.2f} | {micros:>12.1f} | "
            f"{1e3 * micros / args.batch:>10.1f} |"
        )


if __name__ == "__main__":
    main()
