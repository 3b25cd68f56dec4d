"""Tiled causal attention with an online softmax and a recomputing backward pass, in plain JAX.

Why: on a CPU, XLA runs attention as whole-array ops, so every intermediate of
size [B, heads, T, T] (logits, weights, their gradients) goes through main
memory several times; at T = 1024 that traffic, not arithmetic, set the step
time of small models (the blocked path in prefjax.models.cpu.blocked_attention still
materialises a [B, heads, block, T] slab per query block). Here each query block
walks the key blocks up to its own end with a running max and sum (the online
softmax), so only [B, heads, block_q, block_k] tiles exist at a time and stay in
cache, and the forward keeps just the output and one log-sum-exp per query and
head. The backward pass recomputes each tile's probabilities from that
log-sum-exp (the standard flash-attention recurrences):

    P = exp(S - lse),  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
    dQ = dS K * scale,  dK = dS^T Q * scale,  dV = P^T dO.

Key blocks are visited in a `fori_loop` per query block (static trip count: the
causal bound), so the program grows with T / block_q, not with the number of
tiles. Requires the mask to exclude keys later in the row (`index_causal`):
key blocks after the query block are never visited.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from prefjax.models.layers import MASKED_LOGIT

Array = jax.Array
_F32 = jnp.float32


def _scores(q_blk: Array, k_blk: Array, mask_blk: Array, scale: float, softcap: Optional[float]) -> Array:
    """[B, K, G, Cq, Ck] float32 masked (and soft-capped) logits of one tile."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_blk, k_blk, preferred_element_type=_F32) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    return jnp.where(mask_blk[:, None, None], s, MASKED_LOGIT)


def _split_heads(q: Array, num_kv: int) -> Array:
    b, t, n, h = q.shape
    return q.reshape(b, t, num_kv, n // num_kv, h)


def _forward(q: Array, k: Array, v: Array, mask: Array, scale: float, softcap: Optional[float],
             block: int) -> tuple[Array, Array]:
    """(output [B, T, N, H], lse [B, K, G, T] float32)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = _split_heads(q, kv)
    outs, lses = [], []
    for start in range(0, t, block):
        end = min(start + block, t)
        q_blk, rows = qg[:, start:end], end - start
        mask_rows = mask[:, start:end]

        def visit(j, carry, q_blk=q_blk, mask_rows=mask_rows):
            m, total, acc = carry
            ks = j * block
            k_blk = jax.lax.dynamic_slice_in_dim(k, ks, block, 1)
            v_blk = jax.lax.dynamic_slice_in_dim(v, ks, block, 1)
            s = _scores(q_blk, k_blk, jax.lax.dynamic_slice_in_dim(mask_rows, ks, block, 2), scale, softcap)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            total = total * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bskh->bqkgh", p.astype(v.dtype), v_blk, preferred_element_type=_F32)
            acc = acc * jnp.moveaxis(corr, 3, 1)[..., None] + pv
            return m_new, total, acc

        init = (jnp.full((b, kv, n // kv, rows), -jnp.inf, _F32), jnp.zeros((b, kv, n // kv, rows), _F32),
                jnp.zeros((b, rows, kv, n // kv, h), _F32))
        m, total, acc = _key_loop(visit, init, end, block)
        outs.append((acc / jnp.moveaxis(total, 3, 1)[..., None]).astype(q.dtype).reshape(b, rows, n, h))
        lses.append(m + jnp.log(total))
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=3)


def _key_loop(visit, init, end: int, block: int):
    """Runs visit over the key blocks that a query block ending at `end` can see (those starting
    before end); the caller pads the keys to whole blocks, so every key block is full-sized."""
    num = -(-end // block)
    if num == 1:
        return visit(0, init)
    return jax.lax.fori_loop(0, num, visit, init)


def _pad_keys(x: Array, block: int) -> Array:
    t = x.shape[1]
    pad = -t % block
    return x if pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _padded(k: Array, v: Array, mask: Array, block: int) -> tuple[Array, Array, Array]:
    """Keys, values and the mask's key axis padded to whole blocks (padding keys are masked)."""
    return _pad_keys(k, block), _pad_keys(v, block), jnp.swapaxes(_pad_keys(jnp.swapaxes(mask, 1, 2), block), 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q: Array, k: Array, v: Array, mask: Array, scale: float, softcap: Optional[float],
           block: int) -> Array:
    kp, vp, mp = _padded(k, v, mask, block)
    return _forward(q, kp, vp, mp, scale, softcap, block)[0]


def _flash_fwd(q, k, v, mask, scale, softcap, block):
    kp, vp, mp = _padded(k, v, mask, block)
    out, lse = _forward(q, kp, vp, mp, scale, softcap, block)
    return out, (q, k, v, mask, out, lse)


def _flash_bwd(scale, softcap, block, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    b, t, n, h = q.shape
    kv = k.shape[2]
    kp, vp, mp = _padded(k, v, mask, block)
    qg, og, dog = _split_heads(q, kv), _split_heads(out, kv), _split_heads(d_out, kv)
    # rowsum(dO * O): the softmax backward's correction term, per query and head.
    delta = jnp.einsum("bqkgh,bqkgh->bkgq", dog.astype(_F32), og.astype(_F32))
    dk = jnp.zeros(kp.shape, _F32)
    dv = jnp.zeros(vp.shape, _F32)
    dqs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        q_blk, do_blk = qg[:, start:end], dog[:, start:end]
        lse_blk, delta_blk, mask_rows = lse[..., start:end], delta[..., start:end], mp[:, start:end]

        def visit(j, carry, q_blk=q_blk, do_blk=do_blk, lse_blk=lse_blk, delta_blk=delta_blk,
                  mask_rows=mask_rows):
            dq, dk, dv = carry
            ks = j * block
            k_blk = jax.lax.dynamic_slice_in_dim(kp, ks, block, 1)
            v_blk = jax.lax.dynamic_slice_in_dim(vp, ks, block, 1)
            s = _scores(q_blk, k_blk, jax.lax.dynamic_slice_in_dim(mask_rows, ks, block, 2), scale, softcap)
            p = jnp.exp(s - lse_blk[..., None])
            dp = jnp.einsum("bqkgh,bskh->bkgqs", do_blk, v_blk, preferred_element_type=_F32)
            ds = p * (dp - delta_blk[..., None])
            if softcap is not None:
                # s = c tanh(x / c), so ds/dx = 1 - (s / c)^2; masked entries hold MASKED_LOGIT, not a capped value.
                ds = ds * jnp.where(s == MASKED_LOGIT, 0.0, 1.0 - jnp.square(s / softcap))
            ds = (ds * scale).astype(q.dtype)
            dq = dq + jnp.einsum("bkgqs,bskh->bqkgh", ds, k_blk, preferred_element_type=_F32)
            dk_blk = jnp.einsum("bkgqs,bqkgh->bskh", ds, q_blk, preferred_element_type=_F32)
            dv_blk = jnp.einsum("bkgqs,bqkgh->bskh", p.astype(v.dtype), do_blk, preferred_element_type=_F32)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, jax.lax.dynamic_slice_in_dim(dk, ks, block, 1) + dk_blk, ks, 1)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, jax.lax.dynamic_slice_in_dim(dv, ks, block, 1) + dv_blk, ks, 1)
            return dq, dk, dv

        init = (jnp.zeros(q_blk.shape, _F32), dk, dv)
        dq_blk, dk, dv = _key_loop(visit, init, end, block)
        dqs.append(dq_blk.reshape(b, end - start, n, h))
    dq = jnp.concatenate(dqs, axis=1).astype(q.dtype)
    return dq, dk[:, :t].astype(k.dtype), dv[:, :t].astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, mask_BxTxT: Array, *,
                    scale: float, logit_softcap: Optional[float] = None, block_size: int = 128) -> Array:
    """Causal GQA attention in [block, block] tiles; same values as softmax attention under `mask`.

    Fully masked query rows (padding) get an average over the keys of the blocks they
    visit rather than over all keys; their outputs are ignored downstream either way.
    """
    return _flash(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxTxT, float(scale),
                  None if logit_softcap is None else float(logit_softcap), int(block_size))
