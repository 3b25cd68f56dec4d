"""Building blocks of the decoder: parameters with logical axes, norms, RoPE, MLP.

Every parameter is an `nnx.Param` whose metadata carries `logical_axes`, the
logical name of each array axis; prefjax.sharding maps them to mesh axes.
Weights are stored as einsum kernels ([in, out...]), not Hugging Face's
[out, in] (the checkpoint importer transposes).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from prefjax import sharding
from prefjax.models.config import ModelConfig
from prefjax.models.cpu import mlp_slices
from prefjax.models.dtypes import dtype_of

Array = jax.Array


def param(rngs: nnx.Rngs, shape: Sequence[int], logical_axes: Sequence[Optional[str]], *,
          init: str = "normal", fan_in: Optional[int] = None, dtype: Any = jnp.float32) -> nnx.Param:
    """A parameter annotated with its logical axes.

    init: "normal" (scaled by 1/sqrt(fan_in)), "zeros" or "ones".
    """
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {shape} and logical axes {logical_axes} differ in rank")
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        std = 1.0 / math.sqrt(fan_in if fan_in is not None else shape[0])
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(logical_axes))


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32; Gemma's variant scales by (1 + w)."""

    def __init__(self, size: int, cfg: ModelConfig, *, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.eps = cfg.norm_eps
        self.offset = cfg.norm_offset
        init = "zeros" if cfg.norm_offset else "ones"
        self.scale = param(rngs, (size,), (axis_name,), init=init, dtype=dtype_of(cfg.param_dtype))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if self.offset:
            scale = 1.0 + scale
        return (normed * scale).astype(x.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> Array:
    """RoPE inverse frequencies [head_dim / 2], with linear or llama3 scaling applied."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / cfg.head_dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: wavelengths longer than the original context are slowed by
        # `factor`, short ones kept, and the band between is interpolated smoothly.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelength = 2.0 * math.pi / inv_freq
        long_wave = wavelength > original / low
        short_wave = wavelength < original / high
        smooth = (original / wavelength - low) / (high - low)
        interpolated = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
        return jnp.where(long_wave, inv_freq / factor, jnp.where(short_wave, inv_freq, interpolated))
    return inv_freq


def apply_rope(x_BxTxNxH: Array, positions_BxT: Array, inv_freq: Array) -> Array:
    """Rotary embedding in the half-split convention (rotate_half), computed in float32."""
    angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x_BxTxNxH.dtype)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU (silu) or GeGLU (tanh-GELU)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        pd = dtype_of(cfg.param_dtype)
        self.gate = param(rngs, (d, f), ("embed", "mlp"), dtype=pd)
        self.up = param(rngs, (d, f), ("embed", "mlp"), dtype=pd)
        self.down = param(rngs, (f, d), ("mlp", "embed"), dtype=pd)
        self.activation = cfg.activation
        self.dtype = dtype_of(cfg.dtype)
        self.backward_weight = mlp_slices.mlp_backward_weight(cfg)

    def __call__(self, x_BxTxD: Array) -> Array:
        rows, length = x_BxTxD.shape[0], x_BxTxD.shape[1]
        slices = 1
        # Slicing was measured on CPU only (prefjax.models.cpu.mlp_slices); a sharded sequence axis
        # is never sliced (that would gather it).
        if jax.default_backend() == "cpu" and sharding.shards_along("length", length) == 1:
            slices = mlp_slices.mlp_backward_slices(self.backward_weight,
                                                    rows // sharding.shards_along("batch", rows), length)
        return gated_mlp(self.activation, x_BxTxD.astype(self.dtype), self.gate[...].astype(self.dtype),
                         self.up[...].astype(self.dtype), self.down[...].astype(self.dtype), slices)


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def gated_mlp(activation: str, x_BxTxD: Array, w_gate_DxF: Array, w_up_DxF: Array, w_down_FxD: Array,
              backward_slices: int = 1) -> Array:
    """down(act(x gate) * (x up)) with act "silu" (SwiGLU) or "gelu_tanh" (GeGLU).

    A custom VJP whose backward pass keeps only x, gate and up: act(gate) and the
    hidden product are recomputed there (one elementwise pass). Autodiff of the
    plain expression also kept the hidden product and act's intermediates (for
    silu the sigmoid and the activation): about 5 [tokens, F] arrays per layer
    against 2 here, and the MLP's saved activations were the largest part of a
    train step's memory (benchmarks/RESULTS.md, memory table).

    backward_slices > 1 (a divisor of T) runs the backward over that many slices of the
    sequence axis, one after another, so its temporaries (about 7 [tokens, F] arrays) are
    those of one slice; the weight gradients accumulate in float32. The MLP module picks
    it on CPU (prefjax.models.cpu.mlp_slices).
    """
    _check_slices(backward_slices, x_BxTxD.shape[1])
    return _gated_mlp_forward(activation, x_BxTxD, w_gate_DxF, w_up_DxF, w_down_FxD)[0]


def _check_slices(n: int, length: int) -> None:
    if n < 1 or length % n:
        raise ValueError(f"gated_mlp: backward_slices={n} must be a positive divisor of the sequence "
                         f"length {length}")


def _gated_mlp_forward(activation, x, w_gate, w_up, w_down):
    gate = jnp.einsum("btd,df->btf", x, w_gate)
    up = jnp.einsum("btd,df->btf", x, w_up)
    hidden = sharding.constrain(_ACTIVATIONS[activation](gate) * up, ("batch", "length", "act_mlp"))
    return jnp.einsum("btf,fd->btd", hidden, w_down), (gate, up)


def _gated_mlp_fwd(activation, x, w_gate, w_up, w_down, backward_slices):
    _check_slices(backward_slices, x.shape[1])
    out, (gate, up) = _gated_mlp_forward(activation, x, w_gate, w_up, w_down)
    return out, (x, gate, up, w_gate, w_up, w_down)


def _gated_mlp_bwd(activation, n, residuals, d_out):
    x, gate, up, w_gate, w_up, w_down = residuals
    length = x.shape[1]
    if n == 1:
        d_x, grads = _gated_mlp_bwd_slice(activation, x, gate, up, d_out, w_gate, w_up, w_down)
        return (d_x, *(g.astype(w.dtype) for g, w in zip(grads, (w_gate, w_up, w_down))))
    size = length // n

    # A loop, not n unrolled slices: XLA CPU would schedule unrolled slices side by side.
    # The temporaries of the whole unsliced backward were as large as a shallow model's saved
    # activations (tiny/2048 in benchmarks/RESULTS.md: 96 MiB against 225).
    def one_slice(i, carry):
        d_x, grads = carry
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, i * size, size, axis=1)  # noqa: E731
        d_x_i, grads_i = _gated_mlp_bwd_slice(activation, take(x), take(gate), take(up), take(d_out),
                                              w_gate, w_up, w_down)
        d_x = jax.lax.dynamic_update_slice_in_dim(d_x, d_x_i, i * size, axis=1)
        return d_x, tuple(g + gi for g, gi in zip(grads, grads_i))

    # Weight gradients accumulate over slices in float32 (one matmul would accumulate there too).
    zeros = tuple(jnp.zeros(w.shape, jnp.float32) for w in (w_gate, w_up, w_down))
    # d_x starts as a copy of d_out (same shape; every slice is overwritten): a zero-filled
    # start depends on nothing, and XLA CPU fills it at the top of the program, holding a
    # [tokens, D] buffer through the whole forward pass.
    d_x, grads = jax.lax.fori_loop(0, n, one_slice, (d_out.astype(x.dtype), zeros))
    return (d_x, *(g.astype(w.dtype) for g, w in zip(grads, (w_gate, w_up, w_down))))


def _gated_mlp_bwd_slice(activation, x, gate, up, d_out, w_gate, w_up, w_down):
    """d_x and float32 (d_w_gate, d_w_up, d_w_down) of one slice of tokens."""
    d_hidden = jnp.einsum("btd,fd->btf", d_out, w_down)
    # The recomputation must not start before this layer's backward: computed from the saved
    # gate alone, XLA schedules act(gate) and the (transposed) hidden product of every layer
    # right after the forward and keeps them alive through the whole backward, undoing the
    # saving. XLA CPU drops optimization barriers before scheduling, so the dependency is made
    # real: gate + 0 * d_hidden equals gate (NaN/inf in d_hidden make d_gate NaN/inf anyway)
    # and fuses into the elementwise pass that reads gate. The barrier still keeps the
    # recomputation from being merged with the forward's where barriers survive.
    gate, up = jax.lax.optimization_barrier((gate, up))
    gate = gate + (d_hidden * jnp.zeros((), d_hidden.dtype)).astype(gate.dtype)
    act, act_vjp = jax.vjp(_ACTIVATIONS[activation], gate)
    hidden = act * up
    d_gate = act_vjp(d_hidden * up)[0]
    d_up = d_hidden * act
    d_x = jnp.einsum("btf,df->btd", d_gate, w_gate) + jnp.einsum("btf,df->btd", d_up, w_up)
    f32 = dict(preferred_element_type=jnp.float32)
    return d_x, (jnp.einsum("btd,btf->df", x, d_gate, **f32), jnp.einsum("btd,btf->df", x, d_up, **f32),
                 jnp.einsum("btf,btd->fd", hidden, d_out, **f32))


gated_mlp.defvjp(_gated_mlp_fwd, _gated_mlp_bwd)


# The attention logit of a masked key: a finite "minus infinity", so that a query with no
# visible key (a padding query, or a tile of keys it cannot see) gets finite weights instead
# of NaN; those are ignored downstream or wiped out by a later tile's rescaling.
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def softcap(x: Array, cap: Optional[float]) -> Array:
    """cap * tanh(x / cap), Gemma 2's soft-capping; identity when cap is None."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)
