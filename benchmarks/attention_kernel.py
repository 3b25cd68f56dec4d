"""One attention layer, forward + backward + a second forward, per implementation, as a table.

    python benchmarks/attention_kernel.py [--shapes 16x1024x4x2x16,16x1024x8x4x32] [--repeats 5]

Each shape is B x T x heads x kv_heads x head_dim (causal, GQA). The work per call is what a
DPO step asks of one layer: the policy's forward and backward and the frozen reference's
forward. Implementations:

  fused     prefjax's C++ kernel through the XLA FFI (prefjax.models.cpu.fused_attention)
  flash     prefjax's tiled online-softmax attention in plain JAX (prefjax.models.cpu.flash_attention)
  blocked   prefjax's query-blocked einsum attention (prefjax.models.cpu.blocked_attention)
  xla       jax.nn.dot_product_attention
  torch     torch.nn.functional.scaled_dot_product_attention (TRL's path; only if torch imports)

Times are the median wall time over --repeats calls after one warm-up (float32, all cores).
It prints a table and asserts nothing; the numbers quoted in benchmarks/RESULTS.md come from it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from prefjax.models.cpu import blocked_attention, flash_attention, fused_attention

DEFAULT_SHAPES = "16x1024x4x2x16,16x1024x8x4x32,16x256x8x4x32,16x256x12x4x64"
IMPLEMENTATIONS = ("fused", "flash", "blocked", "xla", "torch")


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _jax_layer(impl: str, q, k, v, mask, scale: float) -> Callable[[], object]:
    def attend(q, k, v):
        if impl == "fused":
            return fused_attention.fused_attention(q, k, v, mask, scale=scale)
        if impl == "flash":
            return flash_attention.flash_attention(q, k, v, mask, scale=scale)
        if impl == "blocked":
            return blocked_attention.blocked_attention(q, k, v, mask, scale=scale, logit_softcap=None,
                                                       block_size=64)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)

    def layer(q, k, v):
        grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2))(q, k, v)
        return grads, attend(q, k, v)  # the reference's forward

    step = jax.jit(layer)
    return lambda: jax.block_until_ready(step(q, k, v))


def _torch_layer(b: int, t: int, n: int, kv: int, h: int) -> Optional[Callable[[], object]]:
    try:
        import torch
    except ImportError:
        return None
    q = torch.randn(b, n, t, h, requires_grad=True)
    k = torch.randn(b, kv, t, h, requires_grad=True)
    v = torch.randn(b, kv, t, h, requires_grad=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def layer():
        sdpa(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        with torch.no_grad():
            sdpa(q, k, v, is_causal=True, enable_gqa=True)

    return layer


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    print(f"fused kernel: {'built' if fused_attention.available() else fused_attention.unavailable_reason()}")
    print("| B x T x heads x kv x head_dim | " + " | ".join(f"{i} (ms)" for i in impls) + " |")
    print("|---" * (len(impls) + 1) + "|")
    for shape in args.shapes.split(","):
        b, t, n, kv, h = (int(x) for x in shape.split("x"))
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (b, t, n, h))
        k = jax.random.normal(keys[1], (b, t, kv, h))
        v = jax.random.normal(keys[2], (b, t, kv, h))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        cells = []
        for impl in impls:
            if impl == "torch":
                layer = _torch_layer(b, t, n, kv, h)
            elif impl == "fused" and not fused_attention.available():
                layer = None
            else:
                layer = _jax_layer(impl, q, k, v, mask, float(h) ** -0.5)
            cells.append("-" if layer is None else f"{_median_ms(layer, args.repeats):,.1f}")
        print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
