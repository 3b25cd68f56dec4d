"""The decoder: embedding, a stack of pre-norm blocks, final norm, unembedding.

    model = Transformer(get_preset("llama3-tiny"), rngs=nnx.Rngs(0))
    hidden, _ = model(tokens_BxT)                      # [B, T, D] after the final norm
    logits = model.logits(hidden)                      # [B, T, V]; training code uses
                                                       # prefjax.logprobs on hidden instead
The forward returns hidden states rather than logits so that the log-prob code
can unembed chunk by chunk without a [B, T, V] float32 tensor.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from prefjax import sharding
from prefjax.models.attention import Attention
from prefjax.models.config import ModelConfig
from prefjax.models.dtypes import dtype_of
from prefjax.models.layers import MLP, RMSNorm, param, rope_inverse_frequencies, softcap

Array = jax.Array
Cache = list[dict[str, Array]]

_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """Pre-norm residual block; Gemma 2 adds norms after attention and after the MLP."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.attn = Attention(cfg, layer, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:
            self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
            self.post_mlp_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)

    def __call__(self, x: Array, positions: Array, segments: Array, inv_freq: Array,
                 cache: Optional[dict[str, Array]] = None, cache_index: Optional[Array] = None,
                 branches: Optional[Array] = None) -> tuple[Array, Optional[dict[str, Array]]]:
        h, cache = self.attn(self.attn_norm(x), positions, segments, inv_freq, cache, cache_index, branches)
        if self.post_norms:
            h = self.post_attn_norm(h)
        x = x + h.astype(x.dtype)
        h = self.mlp(self.mlp_norm(x))
        if self.post_norms:
            h = self.post_mlp_norm(h)
        x = x + h.astype(x.dtype)
        return sharding.constrain(x, ("batch", "length", "act_embed")), cache


class Transformer(nnx.Module):
    """A decoder-only language model configured by ModelConfig."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = dtype_of(cfg.param_dtype)
        self.embedding = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                               fan_in=cfg.hidden_size, dtype=pd)
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype=pd)

    def embed(self, tokens_BxT: Array) -> Array:
        dtype = dtype_of(self.cfg.dtype)
        x = jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(dtype)
        if self.cfg.scale_embeddings:
            # Gemma rounds the normaliser to the compute dtype before multiplying.
            x = x * jnp.asarray(self.cfg.hidden_size**0.5, dtype)
        return sharding.constrain(x, ("batch", "length", "act_embed"))

    def __call__(self, tokens_BxT: Array, *, positions_BxT: Optional[Array] = None,
                 segments_BxT: Optional[Array] = None, cache: Optional[Cache] = None,
                 cache_index: Optional[Array] = None, branches_BxT: Optional[Array] = None,
                 ) -> tuple[Array, Optional[Cache]]:
        """Hidden states after the final norm, [B, T, D], and the updated cache.

        positions default to 0..T-1 and segments to 1 (one unpadded sequence per
        row); pass segments 0 on padding tokens, and distinct ids to pack rows.
        `branches_BxT` (prefix-shared rows, prefjax.data.prefix_sharing): 0 on a
        shared prompt, k + 1 on response k; a response token sees the prompt and
        its own response only. Not with a KV cache.
        """
        if branches_BxT is not None and cache is not None:
            raise ValueError("branches_BxT (prefix-shared rows) is for training forwards, not with a KV cache")
        b, t = tokens_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segments_BxT is None:
            segments_BxT = jnp.ones((b, t), jnp.int32)
        inv_freq = rope_inverse_frequencies(self.cfg)
        x = self.embed(tokens_BxT)
        new_cache = [] if cache is not None else None
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = self._run_block(block, x, positions_BxT, segments_BxT, inv_freq,
                                             layer_cache, cache_index, branches_BxT)
            if new_cache is not None:
                new_cache.append(layer_cache)
        return self.final_norm(x), new_cache

    def _run_block(self, block, x, positions, segments, inv_freq, cache, cache_index, branches):
        if self.cfg.remat == "none" or cache is not None:
            return block(x, positions, segments, inv_freq, cache, cache_index, branches)
        policy = _REMAT_POLICIES[self.cfg.remat]
        run = nnx.remat(lambda blk, *args: blk(*args), policy=policy)
        return run(block, x, positions, segments, inv_freq, None, None, branches)

    def unembedding(self) -> Array:
        """[D, V] matrix mapping final hidden states to logits (tied: embedding transposed)."""
        return self.embedding[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def logits(self, hidden_BxTxD: Array) -> Array:
        """Full float32 logits (tests, sampling); training uses chunked log-probs instead."""
        dtype = dtype_of(self.cfg.dtype)
        logits = jnp.einsum("btd,dv->btv", hidden_BxTxD.astype(dtype), self.unembedding().astype(dtype),
                            preferred_element_type=jnp.float32)
        return softcap(logits, self.cfg.final_logit_softcap)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Optional[str] = None) -> Cache:
    """An empty KV cache: every slot has segment 0, so nothing in it is visible."""
    dt = dtype_of(dtype or cfg.dtype)
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    return [
        {
            "k": jnp.zeros(shape, dt),
            "v": jnp.zeros(shape, dt),
            "positions": jnp.zeros((batch, length), jnp.int32),
            "segments": jnp.zeros((batch, length), jnp.int32),
        }
        for _ in range(cfg.num_layers)
    ]


CACHE_LOGICAL_AXES = {
    "k": ("batch", "cache_length", "act_kv_heads", None),
    "v": ("batch", "cache_length", "act_kv_heads", None),
    "positions": ("batch", "cache_length"),
    "segments": ("batch", "cache_length"),
}
