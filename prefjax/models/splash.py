"""TPU splash attention (jax's Pallas kernel) for training and prefill forwards.

Chosen with `ModelConfig.attention_impl="splash"`. The kernel builds its mask
from the row index (causal, or a local window) and from segment ids, which is
the same visibility prefjax's position-based mask gives for right-padded or
packed rows whose positions count up within each segment; decoding against a
KV cache keeps the general path. Grouped-query attention runs the kernel's
multi-query form once per key/value head. Under a mesh the kernel is wrapped
in `shard_map` over the batch and head axes, so each device runs it on its own
shard instead of XLA gathering the operands for the custom call.

Off TPU the kernel runs in Pallas interpret mode: exact but slow, for tests.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

from prefjax import sharding

Array = jax.Array
_BLOCK = 128  # the kernel's tiles are multiples of the TPU's 128 lanes


def _block_size(length: int) -> int:
    if length % _BLOCK:
        raise ValueError(f"splash attention needs the sequence length ({length}) to be a multiple of "
                         f"{_BLOCK}; pad rows to such a bucket, or use attention_impl='xla'")
    return _BLOCK


@functools.lru_cache(maxsize=64)
def _kernel(length: int, group: int, window: Optional[int], softcap: Optional[float], interpret: bool):
    shape = (length, length)
    base = mask_lib.CausalMask(shape) if window is None else mask_lib.LocalMask(shape, (window - 1, 0), 0)
    b = _block_size(length)
    blocks = kernel_lib.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                   block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return kernel_lib.make_splash_mqa_single_device(
        mask_lib.MultiHeadMask([base] * group), block_sizes=blocks, attn_logits_soft_cap=softcap,
        interpret=interpret)


def _local_attention(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, segments_BxT: Array, *,
                     scale: float, window: Optional[int], logit_softcap: Optional[float]) -> Array:
    b, t, n, h = q_BxTxNxH.shape
    kv = k_BxTxKxH.shape[2]
    group = n // kv
    kernel = _kernel(t, group, window, logit_softcap, jax.devices()[0].platform != "tpu")

    def one_row(q, k, v, seg):  # q [T, N, H], k/v [T, K, H]
        ids = kernel_lib.SegmentIds(q=seg, kv=seg)
        q_kgth = (q * jnp.asarray(scale, q.dtype)).reshape(t, kv, group, h).transpose(1, 2, 0, 3)
        out = jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(
            q_kgth, k.transpose(1, 0, 2), v.transpose(1, 0, 2))
        return out.transpose(2, 0, 1, 3).reshape(t, n, h)

    return jax.vmap(one_row)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT)


def splash_attention(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, segments_BxT: Array, *,
                     scale: float, window: Optional[int], logit_softcap: Optional[float]) -> Array:
    """Causal (or sliding-window) attention within segments; segment 0 is padding."""
    run = functools.partial(_local_attention, scale=scale, window=window, logit_softcap=logit_softcap)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT)
    batch = sharding.logical_to_spec(("batch",), segments_BxT.shape[:1], mesh)[0]
    # Heads are split only when both query and key/value heads divide evenly.
    heads = sharding.logical_to_spec(("act_kv_heads",), k_BxTxKxH.shape[2:3], mesh)[0]
    if heads is not None and q_BxTxNxH.shape[2] % (k_BxTxKxH.shape[2]) == 0:
        qkv_spec = PartitionSpec(batch, None, heads, None)
    else:
        qkv_spec = PartitionSpec(batch, None, None, None)
    return jax.shard_map(run, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, PartitionSpec(batch, None)),
                         out_specs=qkv_spec, check_vma=False)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT)
