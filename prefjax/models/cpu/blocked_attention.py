"""Einsum attention over causal query blocks: the CPU default up to 512 tokens without the kernel.

Profiling the train step on a 2-core CPU showed attention taking 60-70 % of a small
model's step through `jax.nn.dot_product_attention`; query blocks that each attend only
to the keys up to their own end skip most of the masked upper triangle and run its
forward and backward 2.5-3x faster (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from prefjax.models.einsum_attention import einsum_attention

Array = jax.Array


def blocked_attention(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, mask_BxTxT: Array, *,
                      scale: float, logit_softcap: Optional[float], block_size: int) -> Array:
    """Einsum attention over query blocks, each against the keys up to the block's end.

    Exact when no query sees a later key in its row (`index_causal`), since
    the keys left out are exactly those. Cuts the logits computed from T*T to
    about T*(T + block)/2; the blocks are static slices, so each is one
    ordinary XLA fusion.
    """
    t = q_BxTxNxH.shape[1]
    if t <= block_size:
        return einsum_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxTxT, scale=scale,
                                logit_softcap=logit_softcap)
    outs = []
    for start in range(0, t, block_size):
        end = min(start + block_size, t)
        outs.append(einsum_attention(q_BxTxNxH[:, start:end], k_BxTxKxH[:, :end], v_BxTxKxH[:, :end],
                                     mask_BxTxT[:, start:end, :end], scale=scale, logit_softcap=logit_softcap))
    return jnp.concatenate(outs, axis=1)


