"""Grouped-query attention with masks built from positions and segment ids.

Which keys a query may see is decided from per-token metadata rather than from
array indices, so one rule covers training rows, packed rows and decoding
against a KV cache:

    visible(q, k) = seg[k] == seg[q] and seg[k] != 0       (same sequence, not padding)
                    and pos[k] <= pos[q]                    (causal)
                    and pos[q] - pos[k] < window            (sliding-window layers)

Segment id 0 marks padding (and empty cache slots). A forward without a KV
cache also never lets a query see a key later in its row (true of every row
layout the data pipeline makes: positions count up within each segment), which
is what lets the blocked path skip work.

Implementations (`ModelConfig.attention_impl`; None takes $PREFJAX_ATTENTION when set,
else the backend's default):
- "xla" / "cudnn" (and None off CPU): `jax.nn.dot_product_attention`, the GPU and TPU path.
- "splash": the TPU Pallas kernel (prefjax.models.splash) for forwards without a KV cache.
- CPU paths (prefjax.models.cpu; None on CPU picks one, prefjax.models.cpu.defaults):
  "fused", a C++ flash-attention kernel called through the XLA FFI, the default for
  float32 whenever it builds (it beats torch's fused CPU kernel, TRL's path, at every
  measured length); "blocked", einsum attention over causal query blocks (the default
  up to 512 tokens without the kernel); "flash", tiles with an online softmax and a
  recomputing backward in JAX (from 1024 tokens).
Soft-capped logits (Gemma 2), which the fused kernels lack, always take the einsum
path (prefjax.models.einsum_attention; blocked without a cache).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from prefjax import sharding
from prefjax.models import splash
from prefjax.models.config import ModelConfig
from prefjax.models.cpu import blocked_attention, flash_attention, fused_attention
from prefjax.models.cpu import defaults as cpu_defaults
from prefjax.models.dtypes import dtype_of
from prefjax.models.einsum_attention import einsum_attention
from prefjax.models.layers import RMSNorm, apply_rope, param

Array = jax.Array



def attention_mask(q_positions_BxT: Array, q_segments_BxT: Array, k_positions_BxS: Array,
                   k_segments_BxS: Array, window: Optional[int], branches_BxT: Optional[Array] = None) -> Array:
    """[B, T, S] boolean mask of visible keys (see module docstring).

    With `branches_BxT` (queries and keys are the same row: prefix-shared rows),
    a key on a response branch is visible only to queries on that branch; keys
    on branch 0 (the shared prompt) stay visible to all.
    """
    same = (k_segments_BxS[:, None, :] == q_segments_BxT[:, :, None]) & (k_segments_BxS[:, None, :] != 0)
    delta = q_positions_BxT[:, :, None] - k_positions_BxS[:, None, :]
    visible = same & (delta >= 0)
    if window is not None:
        visible = visible & (delta < window)
    if branches_BxT is not None:
        key_branch = branches_BxT[:, None, :]
        visible = visible & ((key_branch == 0) | (key_branch == branches_BxT[:, :, None]))
    return visible


def index_causal(mask_BxTxS: Array) -> Array:
    """`mask` and "the key is not later in the row than the query" (forwards without a cache)."""
    t, s = mask_BxTxS.shape[1:]
    return mask_BxTxS & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None]


def resolve_implementation(requested: Optional[str], length: Optional[int] = None,
                           fused_supported: Callable[[], bool] = lambda: False) -> Optional[str]:
    """The implementation a call uses: `requested`, else $PREFJAX_ATTENTION when set, else on CPU
    the measured default (prefjax.models.cpu.defaults: "fused", "blocked" or "flash"), elsewhere
    None (jax's choice). `fused_supported` is asked only on that CPU default path, so other
    backends never build the kernel."""
    if requested is None:
        requested = os.environ.get("PREFJAX_ATTENTION") or None
    if requested is None and jax.default_backend() == "cpu":
        return cpu_defaults.default_attention(length, fused_supported)
    return requested


def dot_product_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxTxS: Array, *,
                          scale: float, logit_softcap: Optional[float],
                          implementation: Optional[str] = None, block_size: Optional[int] = None,
                          causal_rows: bool = False,
                          layout: Optional[fused_attention.TokenLayout] = None) -> Array:
    """Softmax attention with GQA through the configured implementation.

    `causal_rows` says the mask already excludes keys later in the row (a
    forward without a cache), which the blocked and flash paths need; without
    it they fall back to plain einsum attention. `block_size` None takes each
    path's measured default. `layout` (self-attention without a cache) is what
    the mask was made of; the fused CPU kernel then reads it instead of the mask.
    """
    self_attention = causal_rows and q_BxTxNxH.shape[1] == k_BxSxKxH.shape[1]
    def fused_supported() -> bool:
        return self_attention and fused_attention.supports(q_BxTxNxH, logit_softcap)

    implementation = resolve_implementation(implementation, q_BxTxNxH.shape[1], fused_supported)
    if implementation == "fused":
        if not fused_supported():
            raise ValueError(
                "attention_impl='fused' needs a float32 forward without a KV cache, head_dim in "
                f"{fused_attention.SUPPORTED_HEAD_DIMS}, no logit soft-cap and a C++ compiler "
                f"(got dtype {q_BxTxNxH.dtype}, head_dim {q_BxTxNxH.shape[-1]}, softcap {logit_softcap}, "
                f"KV cache {not self_attention}; kernel: {fused_attention.unavailable_reason() or 'built'})")
        # With the layout the mask is made of, the kernel builds the tiles it reads and the
        # [B, T, S] mask is never materialised (XLA drops it when nothing else reads it).
        return fused_attention.fused_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH,
                                             mask_BxTxS if layout is None else layout, scale=scale)
    if implementation in ("blocked", "flash") or logit_softcap is not None:
        if not self_attention:
            return einsum_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale=scale,
                                    logit_softcap=logit_softcap)
        if implementation == "flash":
            return flash_attention.flash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale=scale,
                                                   logit_softcap=logit_softcap,
                                                   block_size=block_size or cpu_defaults.DEFAULT_BLOCK["flash"])
        return blocked_attention.blocked_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale=scale,
                                                   logit_softcap=logit_softcap,
                                                   block_size=block_size or cpu_defaults.DEFAULT_BLOCK["blocked"])
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_BxTxS[:, None, :, :], scale=scale,
        implementation=implementation,
    )


class Attention(nnx.Module):
    """Multi-head attention with GQA, optional QKV bias, QK-norm and soft-capping."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        d, n, kv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = dtype_of(cfg.param_dtype)
        self.q = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), dtype=pd)
        self.k = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), dtype=pd)
        self.v = param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), dtype=pd)
        self.o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), fan_in=n * h, dtype=pd)
        if cfg.qkv_bias:
            self.q_bias = param(rngs, (n, h), ("heads", "head_dim"), init="zeros", dtype=pd)
            self.k_bias = param(rngs, (kv, h), ("kv_heads", "head_dim"), init="zeros", dtype=pd)
            self.v_bias = param(rngs, (kv, h), ("kv_heads", "head_dim"), init="zeros", dtype=pd)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg, rngs=rngs, axis_name="head_dim")
            self.k_norm = RMSNorm(h, cfg, rngs=rngs, axis_name="head_dim")
        self.qkv_bias = cfg.qkv_bias
        self.qk_norm = cfg.qk_norm
        self.window = cfg.layer_window(layer)
        self.scale = (cfg.query_pre_attn_scalar or h) ** -0.5
        self.logit_softcap = cfg.attn_logit_softcap
        self.implementation = cfg.attention_impl
        self.block_size = cfg.attention_block_size
        self.dtype = dtype_of(cfg.dtype)

    def _project(self, x: Array, kernel: nnx.Param, bias_name: str) -> Array:
        out = jnp.einsum("btd,dnh->btnh", x, kernel[...].astype(self.dtype))
        if self.qkv_bias:
            out = out + getattr(self, bias_name)[...].astype(self.dtype)
        return out

    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segments_BxT: Array, inv_freq: Array,
                 cache: Optional[dict[str, Array]] = None, cache_index: Optional[Array] = None,
                 branches_BxT: Optional[Array] = None) -> tuple[Array, Optional[dict[str, Array]]]:
        """Attends over x itself, or over a KV cache that x's keys are written into.

        With `cache` ({"k", "v": [B, S, K, H], "positions", "segments": [B, S]}),
        x's keys and values are written at `cache_index` and the queries attend
        over the whole cache; the updated cache is returned.
        """
        x = x_BxTxD.astype(self.dtype)
        q = self._project(x, self.q, "q_bias")
        k = self._project(x, self.k, "k_bias")
        v = self._project(x, self.v, "v_bias")
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions_BxT, inv_freq)
        k = apply_rope(k, positions_BxT, inv_freq)
        q = sharding.constrain(q, ("batch", "length", "act_heads", None))
        k_positions, k_segments = positions_BxT, segments_BxT
        if cache is not None:
            start = (0, cache_index, 0, 0)
            cache = {
                "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
                "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start),
                "positions": jax.lax.dynamic_update_slice(cache["positions"], positions_BxT, (0, cache_index)),
                "segments": jax.lax.dynamic_update_slice(cache["segments"], segments_BxT, (0, cache_index)),
            }
            k, v = cache["k"].astype(self.dtype), cache["v"].astype(self.dtype)
            k_positions, k_segments = cache["positions"], cache["segments"]
        if self.implementation == "splash" and branches_BxT is not None:
            raise ValueError("attention_impl='splash' does not support prefix-shared rows (branches); "
                             "use 'xla' or the default")
        if self.implementation == "splash" and cache is None:
            out = splash.splash_attention(q, k, v, segments_BxT, scale=self.scale, window=self.window,
                                          logit_softcap=self.logit_softcap)
        else:
            mask = attention_mask(positions_BxT, segments_BxT, k_positions, k_segments, self.window, branches_BxT)
            if cache is None:
                mask = index_causal(mask)
            implementation = None if self.implementation == "splash" else self.implementation
            layout = None
            if cache is None:
                branches = jnp.zeros_like(segments_BxT) if branches_BxT is None else branches_BxT
                layout = fused_attention.TokenLayout(positions_BxT, segments_BxT, branches, self.window)
            out = dot_product_attention(q, k, v, mask, scale=self.scale, logit_softcap=self.logit_softcap,
                                        implementation=implementation, block_size=self.block_size,
                                        causal_rows=cache is None, layout=layout)
        out = jnp.einsum("btnh,nhd->btd", out, self.o[...].astype(self.dtype))
        return out, cache
