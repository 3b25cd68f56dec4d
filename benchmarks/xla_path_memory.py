"""The memory tricks on the accelerator's code path: does each one help, or at least cost nothing?

    python benchmarks/xla_path_memory.py                               # the README table (~2 min on CPU)
    python benchmarks/xla_path_memory.py --sizes tiny --length 64      # smoke

Two of prefjax's memory measures were measured on the CPU path (the fused C++ attention
kernel, benchmarks/RESULTS.md) but run on every backend: the gated MLP's custom VJP, which
keeps only x, gate and up for the backward pass and recomputes the rest
(prefjax.models.layers.gated_mlp), and zero buffers tied to a backward-pass value
(prefjax.late_zeros: the log-prob backward's dh, the shared-prefix gather's gradient).
This compiles the DPO train step on the path GPU and TPU runs take (attention_impl="xla",
no CPU kernel, no MLP backward slicing) four ways: plain autodiff, each measure alone,
and both, and prints XLA's account of the compiled program: temporaries, peak (arguments
+ outputs + temporaries - donated aliases) and FLOPs (cost analysis), with each variant's
ratio to plain autodiff. A measure that raised the peak or the FLOPs there would be
confined to the CPU path. Compilation only: no step is run, so the numbers do not depend on
the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os

os.environ.setdefault("PREFJAX_ATTENTION", "xla")  # before prefjax reads it: the accelerator path
os.environ.setdefault("PREFJAX_DISABLE_CPU_KERNEL", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from prefjax import late_zeros, models, roles, scoring  # noqa: E402
from prefjax.data import synthetic_batches  # noqa: E402
from prefjax.models import layers  # noqa: E402
from prefjax.models.cpu import mlp_slices  # noqa: E402
from prefjax.train import loss_inputs, steps  # noqa: E402
from prefjax.train.state import TrainState  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 vocab_size=1024),
    "small": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                  vocab_size=4096),
    "medium": dict(hidden_size=512, intermediate_size=1536, num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64,
                   vocab_size=8192),
}
VARIANTS = ("plain autodiff", "lean MLP VJP", "late zeros", "both (prefjax)")


def _plain_mlp(activation, x, w_gate, w_up, w_down, backward_slices=1):
    """The gated MLP as a plain expression: autodiff keeps what it keeps."""
    del backward_slices
    return layers._gated_mlp_forward(activation, x, w_gate, w_up, w_down)[0]  # pylint: disable=protected-access


def _eager_zeros(value, shape, dtype=jnp.float32):
    del value
    return jnp.zeros(shape, dtype)


@contextlib.contextmanager
def _variant(name: str):
    """Switch the measures off by swapping the functions the model and log-probs call; the MLP
    backward is never sliced (accelerators never slice it)."""
    saved = layers.gated_mlp, late_zeros.zeros_after, mlp_slices.mlp_backward_slices
    mlp_slices.mlp_backward_slices = lambda *args: 1
    if name in ("plain autodiff", "late zeros"):
        layers.gated_mlp = _plain_mlp
    if name in ("plain autodiff", "lean MLP VJP"):
        late_zeros.zeros_after = _eager_zeros
    try:
        yield
    finally:
        layers.gated_mlp, late_zeros.zeros_after, mlp_slices.mlp_backward_slices = saved


def measure(size: str, pairs: int, length: int, variant: str) -> dict[str, float]:
    """XLA's temporaries, peak and FLOPs of the compiled DPO step (MiB, MiB, GFLOP)."""
    cfg = models.get_preset("llama2-tiny", max_position_embeddings=max(length, 64), **SIZES[size])
    graphdef, params = models.init_params(cfg, seed=0)
    tx = optax.adamw(1e-4)
    spec = steps.StepSpec(loss_name="dpo", loss_hparams=(("beta", 0.1),), reference=roles.Reference("frozen"),
                          columns=loss_inputs.Columns())
    trainable = {"model": params}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                       loss_state={}, nonfinite_steps=jnp.zeros((), jnp.int32))
    batch = synthetic_batches.random_batch(pairs, 2, length, cfg.vocab_size, seed=0, fill=1.0).map(jnp.asarray)
    with _variant(variant):
        step = jax.jit(functools.partial(steps.train_step, spec, scoring.Model(cfg, graphdef), tx, lambda s: 1e-4),
                       donate_argnums=(0,))
        compiled = step.lower(state, roles.Fixed(reference=params), batch).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return dict(temp=mem.temp_size_in_bytes / 2**20, peak=peak / 2**20, gflop=float(cost.get("flops", 0.0)) / 1e9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; attention_impl="
          f"{os.environ['PREFJAX_ATTENTION']}; DPO step, {args.pairs} pairs x {args.length} tokens, compile only")
    print("| size | variant | temporaries (MiB) | peak (MiB) | GFLOP | peak / plain | FLOPs / plain |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        plain = None
        for variant in VARIANTS:
            r = measure(size, args.pairs, args.length, variant)
            plain = plain or r
            print(f"| {size} | {variant} | {r['temp']:.1f} | {r['peak']:.1f} | {r['gflop']:.2f} | "
                  f"{r['peak'] / plain['peak']:.3f} | {r['gflop'] / max(plain['gflop'], 1e-12):.3f} |")


if __name__ == "__main__":
    main()
