"""What a preference train step must hold in memory, counted from the architecture.

The yardstick for a step's measured peak (XLA's memory analysis, or a process's RSS):
a step cannot hold less than its parameters, their gradients, the optimizer's
moments, the frozen reference's weights, and the activations the policy's backward
pass reads, so `measured / required` says how much the implementation adds on top.

Activations are counted per token and per layer as the tensors a backward pass
without recomputation reads (float32 or the compute dtype):

    block: norm input and output before attention (2D), q, k, v after RoPE
           (N*H + 2*K*H), the attention output entering the output projection
           (N*H), one log-sum-exp per query head (N, what a fused attention kernel
           keeps instead of the T x T probabilities), norm input and output before
           the MLP (2D), gate and up projections (2F), their gated product (F);
    top:   the final norm's input and output (2D).

Logits are not counted (chunked log-probs keep one scalar per token); the
reference's forward keeps nothing for a backward pass.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from prefjax.models.config import ModelConfig
from prefjax.models.dtypes import dtype_of


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes each part of a step must occupy (see the module docstring)."""

    params: int
    grads: int
    optimizer: int
    reference: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.reference + self.activations

    def describe(self) -> str:
        """One line, MiB per part and their sum."""
        mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
        return (f"params {mib(self.params)} + grads {mib(self.grads)} + optimizer {mib(self.optimizer)} + "
                f"reference {mib(self.reference)} + activations {mib(self.activations)} = {mib(self.total)} MiB")


def activation_floats_per_token(cfg: ModelConfig) -> int:
    """Values per token the policy's backward pass reads (module docstring)."""
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = 2 * d + (n * h + 2 * k * h) + n * h + n + 2 * d + 2 * f + f
    return cfg.num_layers * per_layer + 2 * d


def preference_step_memory(cfg: ModelConfig, tokens: int, *, optimizer_slots: int = 2,
                           reference: bool = True, reference_dtype: str = "") -> StepMemory:
    """Required bytes of one step over `tokens` tokens (rows x row length).

    Args:
      cfg: the policy's model config (param and compute dtypes included).
      tokens: tokens in the policy's forward (all response rows, padding included).
      optimizer_slots: optimizer moments per parameter (Adam/AdamW 2, Lion/momentum 1,
        SGD 0), kept in the parameter dtype.
      reference: whether a frozen reference copy is held.
      reference_dtype: the reference's dtype; "" = the policy's param dtype.
    """
    n = cfg.num_params
    param_bytes = jnp.dtype(dtype_of(cfg.param_dtype)).itemsize
    ref_bytes = jnp.dtype(dtype_of(reference_dtype or cfg.param_dtype)).itemsize
    act_bytes = jnp.dtype(dtype_of(cfg.dtype)).itemsize
    return StepMemory(
        params=n * param_bytes, grads=n * param_bytes, optimizer=optimizer_slots * n * param_bytes,
        reference=n * ref_bytes if reference else 0,
        activations=tokens * activation_floats_per_token(cfg) * act_bytes,
    )
