"""Softmax attention from plain einsums: the path every other implementation is tested against.

Used directly for forwards against a KV cache (decoding) and for soft-capped logits
(Gemma 2), which the fused kernels lack, and per query block by the CPU's blocked path
(prefjax.models.cpu.blocked_attention).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from prefjax.models.layers import MASKED_LOGIT, softcap

Array = jax.Array


def einsum_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxTxS: Array, *,
                     scale: float, logit_softcap: Optional[float]) -> Array:
    """Softmax attention with GQA (N query heads share K key/value heads) from plain einsums.

    The softmax is normalised after the value product (one [B, T, N] division
    instead of one over [B, N, T, S]); logits and their exponentials stay float32.
    """
    b, t, n, h = q_BxTxNxH.shape
    kv = k_BxSxKxH.shape[2]
    q = q_BxTxNxH.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k_BxSxKxH, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        logits = softcap(logits, logit_softcap)
    logits = jnp.where(mask_BxTxS[:, None, None, :, :], logits, MASKED_LOGIT)
    # Any per-row constant works for stability; no gradient needs to flow through it.
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum("bkgts,bskh->btkgh", weights.astype(v_BxSxKxH.dtype), v_BxSxKxH,
                     preferred_element_type=jnp.float32)
    total = jnp.einsum("bkgts->btkg", weights)[..., None]
    return (out / total).astype(v_BxSxKxH.dtype).reshape(b, t, n, h)


