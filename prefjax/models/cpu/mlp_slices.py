"""When the gated MLP's backward runs over slices of the sequence axis (CPU only).

The gated MLP's custom VJP (prefjax.models.layers.gated_mlp) can run its backward over
equal slices of the sequence, one after another, so that its temporaries are those of
one slice. On a 2-core CPU that was measured to lower the compiled step's peak memory of
shallow models with wide MLPs (benchmarks/RESULTS.md: tiny/2048, one layer's backward
temporaries of 96 MiB against 225 MiB of saved activations). Accelerators run the
backward whole (a loop of small matmuls there would cost throughput).
"""

from __future__ import annotations

import math

from prefjax.models import memory_budget
from prefjax.models.config import ModelConfig

# The gated MLP's backward temporaries per token: the hidden cotangent, act(gate) recomputed,
# act's derivative, d_gate, d_up, the hidden product and its transpose (the compiled CPU
# program holds about this many [tokens, F] arrays at once).
_MLP_BACKWARD_TEMPORARIES = 7
# Most of a step's saved activations that one MLP backward may add on top of them.
MLP_BACKWARD_SHARE = 0.2
# Fewest tokens (on one device) per backward slice: smaller slices make small, slow matmuls.
MIN_MLP_SLICE_TOKENS = 256


def mlp_backward_weight(cfg: ModelConfig) -> float:
    """One MLP backward's temporaries over the step's saved activations (per token, unsliced)."""
    return _MLP_BACKWARD_TEMPORARIES * cfg.intermediate_size / memory_budget.activation_floats_per_token(cfg)


def mlp_backward_slices(weight: float, rows: int, length: int) -> int:
    """Equal slices of the sequence axis for the MLP backward (see `gated_mlp`).

    The fewest that bring `weight` (`mlp_backward_weight`) under MLP_BACKWARD_SHARE,
    rounded up to a divisor of `length`, while a slice keeps at least
    MIN_MLP_SLICE_TOKENS tokens of the `rows` on one device. A shallow model with a
    wide MLP is sliced (2 layers, F = 2 D: 4 slices), a deep one is not (the MLP's
    temporaries are small next to all layers' saved activations).
    """
    wanted = math.ceil(weight / MLP_BACKWARD_SHARE)
    best = 1
    for n in range(2, length + 1):
        if rows * (length // n) < MIN_MLP_SLICE_TOKENS:
            break
        if length % n == 0:
            best = n
            if n >= wanted:
                break
    return best if wanted > 1 else 1
