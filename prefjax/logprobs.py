"""Per-token log-probs and KL from final hidden states, without materialising [B, T, V] logits.

A preference loss needs, per response token, log pi(y_t | x, y_<t) (and, for TDPO, the
full-vocabulary KL between the reference and the policy at that position). Computing these
as log_softmax(hidden @ unembed) holds a float32 [B, T, V] logits tensor, plus its softmax
and its gradient in the backward pass: at B = 8, T = 2048, V = 128k that is 8 GiB each.
This module computes the same quantities tile by tile and holds only a few tiles at once.

Causal-LM convention
--------------------
``hidden_BxTxD[:, t]`` is the final hidden state (after the final norm) once the model has
read ``tokens[:, :t + 1]``; it predicts the *next* token. So the label of position t is
``labels[:, t] = tokens[:, t + 1]``, and a loss mask given in token coordinates (1 on the
tokens to score, e.g. the response and its EOS) moves left with it:
``mask[:, t] = loss_mask[:, t + 1]``. The last position predicts nothing (mask 0) and the
first token is never scored. `shift_labels` builds both; every other function here takes
labels and masks already aligned with the hidden states. Labels must lie in [0, V) where
the mask is 1; at masked positions they may be anything (-100 included).

How it is computed
------------------
The sequence axis is cut into tiles of `chunk_size` positions and, optionally, the
vocabulary into tiles of `vocab_chunk_size` columns. A ragged last tile is not padded: it is
shifted left to end at the array's end, and the entries it shares with the previous tile
count only once (each entry is owned by the first tile covering it), so neither the hidden
states nor the unembedding are ever copied into a padded buffer. Over the vocabulary an
online logsumexp (running max and rescaled sum) gives log Z per position, and for the KL the
running sum of p_ref * (z_ref - z_policy) is rescaled the same way.

Matmuls run in `compute_dtype` (default: the inputs' common dtype) with float32 accumulation
(`preferred_element_type`); the soft-cap, log-softmax and KL run in float32.

Memory
------
The functions are `jax.custom_vjp`s rather than autodiff through a remat'd scan:

* forward: float32 [B, chunk, vocab_chunk] logits tiles (one per model) at a time. The only
  residuals kept for the backward pass are the inputs (which the caller holds anyway) and
  log Z per position ([B, T] float32 per model), so nothing of size V survives the forward.
* backward: per tile, the logits are recomputed, p = exp(z - log Z) uses the saved log Z
  (no second logsumexp pass), and dz = g (onehot - p) [+ g_kl (p - p_ref)] feeds two
  matmuls: dh += dz @ W^T, dW += h^T @ dz. The running dW is a float32 [D, V] buffer (the
  size of the unembedding's gradient) and dh a float32 [B, T, D] buffer. The reference
  model gets no backward pass at all (its cotangents are symbolic zeros).

So the extra memory is O(B * chunk * vocab_chunk) for the tiles plus the gradient buffers,
independent of T. `tile_tokens` bounds B * chunk (B counted on one device), so a batch with
many rows gets shorter tiles; the train step's default, 512 tokens, costs no measurable time on
the CPU benchmark sizes (benchmarks/RESULTS.md) and keeps the tiles small next to a small
model's activations. dh starts as zeros tied to the incoming cotangent (`prefjax.late_zeros`), and
the scored-first permutation's transpose is a gather, so no [B, T, D] buffer is allocated
before the backward pass needs it. Measured by benchmarks/logprobs_memory.py (XLA temporary buffers of the
jitted forward + backward, float32, D = 128, chunk 128, CPU): the naive computation needs
5 float32 [B, T, V] tensors (5120 MiB at 1x2048x131072), autodiff through lax.scan +
jax.checkpoint about 4 logits tiles (257 MiB), `token_logps` 2 tiles
(128 MiB at V = 128k whatever T is; 12 MiB with vocab_chunk_size=8192), and
`token_logps_and_kl` 2-3 tiles (vs 6 [B, T, V] tensors naively). When the unembedding is
stored in bfloat16, the float32 dW accumulator adds one float32 [D, V] buffer. Rows are also
guarded: a position whose mask is 0, or whose incoming cotangent is exactly 0, has its hidden
state zeroed before any matmul, so inf/NaN hidden states at padding reach neither the
outputs (exact 0 there) nor the gradients.

Notes: `jax.custom_vjp` supports reverse mode (jax.grad, jax.vjp) under jit and vmap but
not forward mode (jax.jvp). Vocabulary tiling slices the unembedding along V; under a mesh
that shards the vocabulary (the default "vocab" -> "tensor" rule) leave
`vocab_chunk_size=None` so the vocabulary reductions stay sharded collectives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from prefjax import late_zeros, sharding

Array = jax.Array

# Positions per sequence tile. At B = 8, V = 128k a float32 logits tile is 512 MiB.
DEFAULT_CHUNK_SIZE = 128

_F32 = jnp.float32
# Smallest sequence tile the compacted path cuts a row into (smaller tiles make small matmuls).
_MIN_COMPACT_TILE = 32
# Fewest positions per sequence tile that a `tile_tokens` budget may leave.
_MIN_TILE_POSITIONS = 8


class TokenLogpsAndKL(NamedTuple):
    """Per-position outputs of `token_logps_and_kl`, each [B, T] float32, 0 where masked.

    Attributes:
      policy_logps: log pi_theta(label | ctx).
      ref_logps: log pi_ref(label | ctx) (no gradient).
      kl: KL(pi_ref(.|ctx) || pi_theta(.|ctx)) over the full vocabulary.
    """

    policy_logps: Array
    ref_logps: Array
    kl: Array


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static tiling and numerics of one call (hashable: a custom_vjp non-differentiable argument)."""

    seq_chunk: int
    vocab_chunk: int
    softcap: Optional[float]
    policy_dtype: Any
    ref_dtype: Any


# ---------------------------------------------------------------------------------------------
# Tiling helpers


def _num_tiles(size: int, tile: int) -> int:
    return -(-size // tile)


def _window(index: Any, tile: int, size: int, n_tiles: int) -> tuple[Optional[Array], Optional[Array]]:
    """Start of tile `index` and a [tile] mask of the entries it owns; (None, None) for one tile.

    The last tile is shifted left to end at `size` instead of being padded; entries that an
    earlier tile already covered are not owned by it and must contribute nothing.
    """
    if n_tiles == 1:
        return None, None
    start = jnp.minimum(index * tile, size - tile)
    owned = start + jnp.arange(tile) >= index * tile
    return start, owned


def _take(x: Optional[Array], start: Optional[Array], size: int, axis: int) -> Optional[Array]:
    if x is None or start is None:
        return x
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _accumulate(buf: Array, val: Array, start: Optional[Array], axis: int) -> Array:
    """buf[window] += val along `axis` (a whole-array add when there is a single tile)."""
    if start is None:
        return buf + val
    current = jax.lax.dynamic_slice_in_dim(buf, start, val.shape[axis], axis)
    return jax.lax.dynamic_update_slice_in_dim(buf, current + val, start, axis)


def _loop(step: Callable[[Any, Any], Any], carry: Any, n: int, active: Optional[Array] = None) -> Any:
    """carry = step(carry, i) for i < n (or < `active`, a traced count); a single tile is one direct
    call, with no loop in the HLO."""
    if n == 1:
        return step(carry, 0)
    return jax.lax.fori_loop(0, n if active is None else active, lambda i, c: step(c, i), carry)


def _active_tiles(mask: Array, size: int) -> Array:
    """Sequence tiles up to the last one holding a masked-in position (later tiles are all 0)."""
    last = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1]) + 1, 0))
    return (last + size - 1) // size


@jax.custom_vjp
def _permute_rows(x: Array, order: Array, inverse: Array) -> Array:
    """x[b, order[b, t]] along axis 1; `inverse` is order's inverse permutation.

    Its transpose is the inverse permutation (a gather), where autodiff of a gather would
    scatter-add into a zero-filled [B, T, ...] buffer.
    """
    return _gather_rows(x, order)


def _gather_rows(x: Array, index: Array) -> Array:
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _permute_rows_fwd(x, order, inverse):
    return _gather_rows(x, order), (order, inverse)


def _permute_rows_bwd(residuals, d_out):
    order, inverse = residuals
    return _gather_rows(d_out, inverse), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def _scored_first(mask: Array) -> tuple[Array, Array, Array]:
    """Per row: (order moving masked-in positions to the front, stably; its inverse; new mask)."""
    order = jnp.argsort(~mask, axis=1, stable=True)
    inverse = jnp.argsort(order, axis=1)
    count = jnp.sum(mask, axis=1, keepdims=True)
    return order, inverse, jnp.arange(mask.shape[1])[None, :] < count


def _label_hits(labels_BxC: Array, start: Optional[Array], owned: Optional[Array], width: int) -> Array:
    """[B, C, width] bool: the column of this vocabulary tile that holds each position's label."""
    cols = jnp.arange(width) if start is None else start + jnp.arange(width)
    hit = cols == labels_BxC[..., None]
    return hit if owned is None else hit & owned


def _label_logit(z_BxCxW: Array, labels_BxC: Array, start: Optional[Array], first: Any) -> Array:
    """[B, C] logit of each position's label if this tile owns that column, else 0.

    A gather, not a masked reduction over the tile: one fewer pass over [B, C, W]. `first` is
    the first column the tile owns; out-of-range labels (masked rows only) are clipped.
    """
    width = z_BxCxW.shape[-1]
    local = labels_BxC if start is None else labels_BxC - start
    value = jnp.take_along_axis(z_BxCxW, jnp.clip(local, 0, width - 1)[..., None], axis=-1)[..., 0]
    if start is None:
        return value
    return jnp.where((labels_BxC >= first) & (local < width), value, 0.0)


def _logits(h_BxCxD: Array, w_DxW: Array, softcap: Optional[float]) -> Array:
    """float32 logits of one tile: matmul in the inputs' dtype, float32 accumulation, soft-cap."""
    z = jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxW, preferred_element_type=_F32)
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return z


# ---------------------------------------------------------------------------------------------
# Forward: online logsumexp over vocabulary tiles, scan over sequence tiles


def _online_update(m: Array, s: Array, z: Array, owned: Optional[Array]):
    """One vocabulary tile of the online logsumexp: running max m and sum s = sum exp(z - m).

    Also returns exp(z - m_new) (0 on columns this tile does not own) for the KL accumulator.
    """
    z_owned = z if owned is None else jnp.where(owned, z, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(z_owned, axis=-1))
    weights = jnp.exp(z_owned - m_new[..., None])
    s_new = s * jnp.exp(m - m_new) + jnp.sum(weights, axis=-1)
    return m_new, s_new, weights


def _chunk_forward(plan: _Plan, h: Array, w: Array, h_ref: Optional[Array], w_ref: Optional[Array],
                   labels: Array) -> dict[str, Array]:
    """Label log-prob and log Z (and the reference's, and the KL) of one sequence tile, each [B, C]."""
    vocab = w.shape[1]
    width = plan.vocab_chunk
    n = _num_tiles(vocab, width)
    neg_inf = jnp.full(labels.shape, -jnp.inf, _F32)
    zero = jnp.zeros(labels.shape, _F32)
    carry = {"m": neg_inf, "s": zero, "zl": zero}
    if h_ref is not None:
        carry.update(m_ref=neg_inf, s_ref=zero, zl_ref=zero, a=zero)

    def step(c: dict[str, Array], j: Any) -> dict[str, Array]:
        start, owned = _window(j, width, vocab, n)
        z = _logits(h, _take(w, start, width, 1), plan.softcap)
        out = dict(c)
        out["m"], out["s"], _ = _online_update(c["m"], c["s"], z, owned)
        out["zl"] = c["zl"] + _label_logit(z, labels, start, j * width)
        if h_ref is not None:
            z_ref = _logits(h_ref, _take(w_ref, start, width, 1), plan.softcap)
            out["m_ref"], out["s_ref"], weights = _online_update(c["m_ref"], c["s_ref"], z_ref, owned)
            out["zl_ref"] = c["zl_ref"] + _label_logit(z_ref, labels, start, j * width)
            # a = sum_v exp(z_ref - m_ref) (z_ref - z), rescaled whenever m_ref moves.
            rescale = jnp.exp(c["m_ref"] - out["m_ref"])
            # A contraction rather than sum(weights * (z_ref - z)): XLA's CPU backend runs that
            # three-operand reduction ~3x slower; other backends turn this dot back into a reduction.
            gap = jnp.einsum("bcv,bcv->bc", weights, z_ref - z, preferred_element_type=_F32)
            out["a"] = c["a"] * rescale + gap
        return out

    c = _loop(step, carry, n)
    log_s = jnp.log(c["s"])
    lse = c["m"] + log_s
    stats = {"logp": c["zl"] - lse, "lse": lse}
    if h_ref is not None:
        log_s_ref = jnp.log(c["s_ref"])
        lse_ref = c["m_ref"] + log_s_ref
        # KL = E_ref[z_ref - z] - (lse_ref - lse); the lse difference is taken as (max gap) +
        # (log-sum gap) so identical models give exactly 0 instead of a rounding residue.
        kl = c["a"] / c["s_ref"] - ((c["m_ref"] - c["m"]) + (log_s_ref - log_s))
        stats.update(ref_logp=c["zl_ref"] - lse_ref, ref_lse=lse_ref, kl=kl)
    return stats


def _forward(plan: _Plan, h: Array, w: Array, h_ref: Optional[Array], w_ref: Optional[Array],
             labels: Array, mask: Array) -> dict[str, Array]:
    """All per-position statistics, [B, T] float32 each, 0 at masked positions."""
    batch, length = labels.shape
    size = plan.seq_chunk
    n = _num_tiles(length, size)
    w = w.astype(plan.policy_dtype)
    if w_ref is not None:
        w_ref = w_ref.astype(plan.ref_dtype)
    names = ("logp", "lse") + (("ref_logp", "ref_lse", "kl") if h_ref is not None else ())

    def step(out: dict[str, Array], i: Any) -> dict[str, Array]:
        start, owned = _window(i, size, length, n)
        keep = _take(mask, start, size, 1)
        if owned is not None:
            keep = keep & owned
        # Zeroing masked rows first keeps inf/NaN padding out of every reduction.
        h_c = jnp.where(keep[..., None], _take(h, start, size, 1), 0).astype(plan.policy_dtype)
        h_ref_c = None
        if h_ref is not None:
            h_ref_c = jnp.where(keep[..., None], _take(h_ref, start, size, 1), 0).astype(plan.ref_dtype)
        stats = _chunk_forward(plan, h_c, w, h_ref_c, w_ref, _take(labels, start, size, 1))
        return {k: _accumulate(out[k], jnp.where(keep, stats[k], 0.0), start, 1) for k in names}

    return _loop(step, {k: jnp.zeros((batch, length), _F32) for k in names}, n, _active_tiles(mask, size))


# ---------------------------------------------------------------------------------------------
# Backward: recompute each tile's logits, reuse the saved log Z


def _chunk_backward(plan: _Plan, h: Array, w: Array, h_ref: Optional[Array], w_ref: Optional[Array],
                    labels: Array, lse: Array, lse_ref: Optional[Array], g: Array, g_kl: Optional[Array],
                    keep: Array, dw: Array) -> tuple[Array, Array]:
    """(dh [B, C, D] float32, dW [D, V] float32 with this tile's contribution added)."""
    vocab = w.shape[1]
    width = plan.vocab_chunk
    n = _num_tiles(vocab, width)

    def step(carry: tuple[Array, Array], j: Any) -> tuple[Array, Array]:
        dh, dw = carry
        start, owned = _window(j, width, vocab, n)
        w_t = _take(w, start, width, 1)
        z = _logits(h, w_t, plan.softcap)
        p = jnp.exp(z - lse[..., None])
        # d logp / dz = onehot(label) - p;  d KL / dz = p - p_ref.
        dz = jnp.where(_label_hits(labels, start, owned, width), g[..., None], 0.0) - g[..., None] * p
        if h_ref is not None:
            p_ref = jnp.exp(_logits(h_ref, _take(w_ref, start, width, 1), plan.softcap) - lse_ref[..., None])
            dz = dz + g_kl[..., None] * (p - p_ref)
        if plan.softcap is not None:
            # z = c tanh(x / c)  =>  dz/dx = 1 - tanh^2 = 1 - (z / c)^2.
            dz = dz * (1.0 - jnp.square(z / plan.softcap))
        valid = keep[..., None] if owned is None else keep[..., None] & owned
        # where, not a product: p is NaN at rows whose saved log Z came from garbage.
        dz = jnp.where(valid, dz, 0.0).astype(plan.policy_dtype)
        dh = dh + jnp.einsum("bcv,dv->bcd", dz, w_t, preferred_element_type=_F32)
        dw = _accumulate(dw, jnp.einsum("bcd,bcv->dv", h, dz, preferred_element_type=_F32), start, 1)
        return dh, dw

    dh0 = jnp.zeros(h.shape, _F32)
    return _loop(step, (dh0, dw), n)


def _backward(plan: _Plan, residuals: tuple, cotangents: tuple) -> tuple:
    h, w, h_ref, w_ref, labels, mask, lse, lse_ref = residuals
    g = cotangents[0]
    g_kl = cotangents[2] if h_ref is not None else None
    batch, length = labels.shape
    size = plan.seq_chunk
    n = _num_tiles(length, size)
    w_c = w.astype(plan.policy_dtype)
    w_ref_c = None if w_ref is None else w_ref.astype(plan.ref_dtype)

    def step(carry: tuple[Array, Array], i: Any) -> tuple[Array, Array]:
        dh, dw = carry
        start, owned = _window(i, size, length, n)
        g_c = _take(g, start, size, 1)
        g_kl_c = _take(g_kl, start, size, 1)
        # Rows with no incoming cotangent are dropped too, so garbage there cannot turn 0 into NaN.
        active = g_c != 0 if g_kl_c is None else (g_c != 0) | (g_kl_c != 0)
        keep = _take(mask, start, size, 1) & active
        if owned is not None:
            keep = keep & owned
        h_c = jnp.where(keep[..., None], _take(h, start, size, 1), 0).astype(plan.policy_dtype)
        h_ref_c = None
        if h_ref is not None:
            h_ref_c = jnp.where(keep[..., None], _take(h_ref, start, size, 1), 0).astype(plan.ref_dtype)
        dh_c, dw = _chunk_backward(
            plan, h_c, w_c, h_ref_c, w_ref_c, _take(labels, start, size, 1), _take(lse, start, size, 1),
            _take(lse_ref, start, size, 1), g_c, g_kl_c, keep, dw)
        return _accumulate(dh, dh_c, start, 1), dw

    dh0 = late_zeros.zeros_after(g, h.shape)  # not filled before the backward pass
    dh, dw = _loop(step, (dh0, jnp.zeros(w.shape, _F32)), n, _active_tiles(mask, size))
    # Labels and mask are not differentiable; the reference gets no gradient (symbolic zeros).
    return dh.astype(h.dtype), dw.astype(w.dtype), None, None, None, None


# ---------------------------------------------------------------------------------------------
# The custom VJP


def _outputs(stats: dict[str, Array]) -> tuple[Array, ...]:
    if "kl" in stats:
        return stats["logp"], stats["ref_logp"], stats["kl"]
    return (stats["logp"],)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(plan: _Plan, h: Array, w: Array, h_ref: Optional[Array], w_ref: Optional[Array],
           labels: Array, mask: Array) -> tuple[Array, ...]:
    return _outputs(_forward(plan, h, w, h_ref, w_ref, labels, mask))


def _fused_fwd(plan: _Plan, h, w, h_ref, w_ref, labels, mask):
    stats = _forward(plan, h, w, h_ref, w_ref, labels, mask)
    # The inputs plus log Z per position: nothing of size V outlives the forward pass.
    residuals = (h, w, h_ref, w_ref, labels, mask, stats["lse"], stats.get("ref_lse"))
    return _outputs(stats), residuals


_fused.defvjp(_fused_fwd, _backward)


def _fused_compacted(plan: _Plan, h: Array, w: Array, h_ref: Optional[Array], w_ref: Optional[Array],
                     labels: Array, mask: Array) -> tuple[Array, ...]:
    """`_fused` on rows whose scored positions were moved to the front, outputs moved back.

    A preference batch scores only the responses: in a row with a long prompt most
    positions are masked out, and unembedding them against the whole vocabulary is
    the single largest waste in a small model's step (the [rows, V] logits matmul
    and its two backward matmuls; 20 % of a 5M-parameter Llama's CPU step at
    prompt = response = 128). Once each row's scored positions come first, every
    sequence tile past the longest row's count is all masked and the tile loops stop
    before it. The permutation is per row, so batch sharding is untouched; it is
    skipped when the row is too short for more than one tile.
    """
    # Tiles of at most a quarter row (not below _MIN_COMPACT_TILE positions), so that a row
    # that fits one default tile still has tiles left to skip.
    length = labels.shape[1]
    plan = dataclasses.replace(plan, seq_chunk=min(plan.seq_chunk, max(_MIN_COMPACT_TILE, -(-length // 4))))
    if _num_tiles(length, plan.seq_chunk) == 1:
        return _fused(plan, h, w, h_ref, w_ref, labels, mask)
    order, inverse, packed_mask = _scored_first(mask)
    gather = lambda x: None if x is None else _permute_rows(x, order, inverse)  # noqa: E731
    outs = _fused(plan, gather(h), w, gather(h_ref), w_ref, _gather_rows(labels, order), packed_mask)
    return tuple(_permute_rows(o, inverse, order) for o in outs)


# ---------------------------------------------------------------------------------------------
# Public API


def _plan(labels_BxT: Array, vocab: int, chunk_size: int, vocab_chunk_size: Optional[int],
          tile_tokens: Optional[int], logit_softcap: Optional[float], policy_dtype: Any,
          ref_dtype: Any) -> _Plan:
    if chunk_size < 1 or (vocab_chunk_size is not None and vocab_chunk_size < 1) or (
            tile_tokens is not None and tile_tokens < 1):
        raise ValueError(f"chunk sizes must be positive, got chunk_size={chunk_size}, "
                         f"vocab_chunk_size={vocab_chunk_size}, tile_tokens={tile_tokens}")
    rows, length = labels_BxT.shape
    if tile_tokens is not None:
        # What one device holds: its rows of the batch times the tile's positions.
        local_rows = max(1, rows // sharding.shards_along("batch", rows))
        chunk_size = min(chunk_size, max(_MIN_TILE_POSITIONS, tile_tokens // local_rows))
    return _Plan(
        seq_chunk=min(chunk_size, length),
        vocab_chunk=vocab if vocab_chunk_size is None else min(vocab_chunk_size, vocab),
        softcap=float(logit_softcap) if logit_softcap else None,
        policy_dtype=jnp.dtype(policy_dtype),
        ref_dtype=None if ref_dtype is None else jnp.dtype(ref_dtype),
    )


def _check(hidden: Array, unembed: Array, labels: Array, what: str) -> None:
    if hidden.ndim != 3 or unembed.ndim != 2 or hidden.shape[-1] != unembed.shape[0]:
        raise ValueError(f"{what}: expected hidden [B, T, D] and unembed [D, V], got {hidden.shape} "
                         f"and {unembed.shape}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"{what}: labels/mask {labels.shape} do not match hidden's [B, T] "
                         f"{hidden.shape[:2]}")


def _compute_dtype(requested: Any, hidden: Array, unembed: Array) -> Any:
    return jnp.result_type(hidden.dtype, unembed.dtype) if requested is None else requested


def _bool_mask(mask_BxT: Optional[Array], labels_BxT: Array) -> Array:
    if mask_BxT is None:
        return jnp.ones(labels_BxT.shape, bool)
    return jnp.asarray(mask_BxT).astype(bool)


def token_logps(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    labels_BxT: Array,
    *,
    mask_BxT: Optional[Array] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: Optional[int] = None,
    tile_tokens: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    compute_dtype: Any = None,
) -> Array:
    """log softmax(softcap(hidden @ unembed))[label] per position, [B, T] float32, chunked.

    Args:
      hidden_BxTxD: final hidden states (after the final norm).
      unembed_DxV: the unembedding ([D, V]; the transposed embedding for tied weights).
      labels_BxT: int next-token labels aligned with `hidden` (see `shift_labels`).
      mask_BxT: optional; where 0 the output is exactly 0 and nothing flows back.
      chunk_size: positions per sequence tile; any value (a ragged last tile is fine).
      vocab_chunk_size: vocabulary columns per tile (online logsumexp); None = whole vocabulary.
      tile_tokens: most tokens in a sequence tile on one device (its rows of the batch times
        the tile's positions); shrinks `chunk_size` for batches with many rows, since a logits
        tile is [rows, positions, vocab_chunk] floats. None = `chunk_size` alone.
      logit_softcap: c for Gemma-2-style logits c * tanh(logits / c); None = no cap.
      compute_dtype: matmul dtype (e.g. jnp.bfloat16); None = the inputs' common dtype.
    """
    labels_BxT = jnp.asarray(labels_BxT)
    _check(hidden_BxTxD, unembed_DxV, labels_BxT, "token_logps")
    dtype = _compute_dtype(compute_dtype, hidden_BxTxD, unembed_DxV)
    plan = _plan(labels_BxT, unembed_DxV.shape[1], chunk_size, vocab_chunk_size, tile_tokens, logit_softcap,
                 dtype, None)
    (logps,) = _fused_compacted(plan, hidden_BxTxD, unembed_DxV, None, None, labels_BxT,
                                _bool_mask(mask_BxT, labels_BxT))
    return logps


def token_logps_and_kl(
    policy_hidden_BxTxD: Array,
    policy_unembed_DxV: Array,
    ref_hidden_BxTxD: Array,
    ref_unembed_DxV: Array,
    labels_BxT: Array,
    mask_BxT: Optional[Array] = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: Optional[int] = None,
    tile_tokens: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    compute_dtype: Any = None,
) -> TokenLogpsAndKL:
    """Policy and reference label log-probs and KL(pi_ref || pi_theta), one pass over the vocabulary.

    What TDPO needs per response token. The reference is wrapped in stop_gradient (and its
    backward is never computed); gradients reach the policy's hidden states and unembedding
    through both the policy log-probs and the KL. The KL is clamped at 0 against float32
    rounding (the clamp is inactive wherever the KL is not within rounding of 0). Arguments
    as in `token_logps`; both models share the vocabulary, the soft-cap and the tiling, and
    each matmul runs in `compute_dtype` or, when None, in that model's own inputs' dtype.

    Returns:
      TokenLogpsAndKL(policy_logps, ref_logps, kl), each [B, T] float32, exactly 0 where masked.
    """
    labels_BxT = jnp.asarray(labels_BxT)
    _check(policy_hidden_BxTxD, policy_unembed_DxV, labels_BxT, "token_logps_and_kl (policy)")
    _check(ref_hidden_BxTxD, ref_unembed_DxV, labels_BxT, "token_logps_and_kl (reference)")
    if ref_unembed_DxV.shape[1] != policy_unembed_DxV.shape[1]:
        raise ValueError(f"policy and reference vocabularies differ: {policy_unembed_DxV.shape[1]} vs "
                         f"{ref_unembed_DxV.shape[1]}")
    policy_dtype = _compute_dtype(compute_dtype, policy_hidden_BxTxD, policy_unembed_DxV)
    ref_dtype = _compute_dtype(compute_dtype, ref_hidden_BxTxD, ref_unembed_DxV)
    plan = _plan(labels_BxT, policy_unembed_DxV.shape[1], chunk_size, vocab_chunk_size, tile_tokens,
                 logit_softcap, policy_dtype, ref_dtype)
    logps, ref_logps, kl = _fused_compacted(
        plan, policy_hidden_BxTxD, policy_unembed_DxV, jax.lax.stop_gradient(ref_hidden_BxTxD),
        jax.lax.stop_gradient(ref_unembed_DxV), labels_BxT, _bool_mask(mask_BxT, labels_BxT))
    return TokenLogpsAndKL(policy_logps=logps, ref_logps=ref_logps, kl=jnp.maximum(kl, 0.0))


def token_kl(
    policy_hidden_BxTxD: Array,
    policy_unembed_DxV: Array,
    ref_hidden_BxTxD: Array,
    ref_unembed_DxV: Array,
    mask_BxT: Optional[Array] = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: Optional[int] = None,
    tile_tokens: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    compute_dtype: Any = None,
) -> Array:
    """Per-position KL(pi_ref(.|ctx) || pi_theta(.|ctx)) over the full vocabulary, [B, T] float32.

    0 at masked positions; no gradient into the reference. Use `token_logps_and_kl` when the
    label log-probs are needed as well: it costs the same single pass.
    """
    labels = jnp.zeros(policy_hidden_BxTxD.shape[:2], jnp.int32)
    return token_logps_and_kl(
        policy_hidden_BxTxD, policy_unembed_DxV, ref_hidden_BxTxD, ref_unembed_DxV, labels, mask_BxT,
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, tile_tokens=tile_tokens,
        logit_softcap=logit_softcap, compute_dtype=compute_dtype).kl


def sequence_logps(token_logps_BxT: Array, mask_BxT: Array) -> tuple[Array, Array]:
    """(sum over masked-in positions [B] float32, their count [B] float32).

    `where`, not a product with the mask: NaN or -inf at masked positions leaks into neither
    the sums nor their gradients.
    """
    keep = jnp.asarray(mask_BxT).astype(bool)
    total = jnp.sum(jnp.where(keep, jnp.asarray(token_logps_BxT, _F32), 0.0), axis=-1)
    return total, jnp.sum(keep, axis=-1).astype(_F32)


def shift_labels(tokens_BxT: Array, loss_mask_BxT: Optional[Array] = None) -> tuple[Array, Array]:
    """Next-token labels and mask aligned with the hidden states that predict them.

    labels[:, t] = tokens[:, t + 1] and mask[:, t] = loss_mask[:, t + 1] (bool); the last
    position has label 0 and mask False. `loss_mask` marks, in token coordinates, the tokens
    to score (e.g. the response); None scores every token but the first.
    """
    tokens_BxT = jnp.asarray(tokens_BxT)
    if loss_mask_BxT is None:
        loss_mask_BxT = jnp.ones(tokens_BxT.shape, bool)
    loss_mask = jnp.asarray(loss_mask_BxT).astype(bool)
    labels = jnp.concatenate([tokens_BxT[:, 1:], jnp.zeros_like(tokens_BxT[:, :1])], axis=1)
    mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    return labels, mask
