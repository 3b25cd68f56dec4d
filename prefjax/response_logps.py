"""From model hidden states over batch rows to per-response log-prob sums.

A batch (prefjax.data.batching) holds rows [R, T] of tokens with a loss mask on
the response tokens, and says which (example, response) each token belongs to.
The model's hidden state at position t predicts token t + 1, so labels, masks
and ids are shifted by one (`prefjax.logprobs.shift_labels`). Log-probs are
computed tile by tile without [R, T, V] logits, then reduced per response:

- unpacked rows (row k * B + b = response k of example b): a reshape to
  [K, B, T] and a masked sum, which also keeps the per-token arrays that
  token-level losses (TDPO) need;
- packed rows: a segment sum over the slot id example_id * K + response_id.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from prefjax import late_zeros, logprobs

Array = jax.Array


def shifted(batch: dict[str, Array]) -> tuple[Array, Array, Array, Array]:
    """(labels, mask, example_id, response_id), each [R, T], aligned with hidden states."""
    labels, mask = logprobs.shift_labels(batch["tokens"], batch["loss_mask"] > 0)

    def shift(x: Array) -> Array:
        return jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], -1)], axis=1)

    return labels, mask, shift(batch["example_id"]), shift(batch["response_id"])


def shared_prefix_targets(batch: dict[str, Array], num_responses: int) -> tuple[Array, ...]:
    """(source, labels, mask, example_id, response_id), each [R, T], for prefix-shared rows.

    Token t is predicted by the hidden state of the token before it on its own
    branch (prefjax.data.prefix_sharing): the previous token of the same
    response, or the last prefix token for a response's first token. `source`
    holds that index (-1: none; such tokens are masked out); labels, mask and
    ids are the token's own, unshifted.
    """
    branches, tokens = batch["branches"], batch["tokens"]
    live = batch["segments"] > 0
    index = jnp.arange(tokens.shape[1])[None, :]

    def last_before(where: Array) -> Array:
        latest = jax.lax.cummax(jnp.where(where, index, -1), axis=1)
        return jnp.concatenate([jnp.full_like(latest[:, :1], -1), latest[:, :-1]], axis=1)

    prefix = last_before(live & (branches == 0))
    source = prefix
    for k in range(1, num_responses + 1):
        own = jnp.maximum(prefix, last_before(live & (branches == k)))
        source = jnp.where(branches == k, own, source)
    mask = (batch["loss_mask"] > 0) & (source >= 0) & live
    return source, tokens, mask, batch["example_id"], batch["response_id"]


def at_sources(hidden_RxTxD: Array, source_RxT: Array) -> Array:
    """hidden[r, source[r, t]] per (row, target token); a gather whose gradient is a scatter-add."""
    return _gather_sources(hidden_RxTxD.shape[1], hidden_RxTxD, jnp.clip(source_RxT, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gather_sources(length: int, hidden: Array, source: Array) -> Array:
    return jnp.take_along_axis(hidden, source[..., None], axis=1)


def _gather_sources_fwd(length, hidden, source):
    return _gather_sources(length, hidden, source), (source,)


def _gather_sources_bwd(length, residuals, d_out):
    # Autodiff's transpose scatter-adds into zeros that XLA fills at the top of the program
    # (a [rows, T, D] buffer held through the forward pass); these zeros wait for d_out.
    (source,) = residuals
    rows, _, dim = d_out.shape
    target = late_zeros.zeros_after(d_out, (rows, length, dim), d_out.dtype)
    # vmapped over rows: a scatter with a batch dimension, which stays local to each row's shard
    d_hidden = jax.vmap(lambda z, s, g: z.at[s].add(g))(target, source, d_out)
    return d_hidden, None


_gather_sources.defvjp(_gather_sources_fwd, _gather_sources_bwd)


def reduce_unpacked(values_RxT: Array, mask_RxT: Array, num_responses: int) -> tuple[Array, Array]:
    """[R, T] per-token values -> ([B, K] masked sums, [B, K] counts) for unpacked rows."""
    r, t = values_RxT.shape
    vals = values_RxT.reshape(num_responses, r // num_responses, t)
    keep = mask_RxT.reshape(num_responses, r // num_responses, t)
    sums, counts = logprobs.sequence_logps(vals, keep)
    return sums.T, counts.T


def reduce_packed(values_RxT: Array, mask_RxT: Array, example_id_RxT: Array, response_id_RxT: Array,
                  num_examples: int, num_responses: int) -> tuple[Array, Array]:
    """[R, T] per-token values -> [B, K] masked sums and counts by (example, response) slot."""
    slots = num_examples * num_responses
    slot = jnp.where(mask_RxT, example_id_RxT * num_responses + response_id_RxT, slots)
    values = jnp.where(mask_RxT, values_RxT.astype(jnp.float32), 0.0)
    sums = jax.ops.segment_sum(values.reshape(-1), slot.reshape(-1), num_segments=slots + 1)[:slots]
    counts = jax.ops.segment_sum(mask_RxT.reshape(-1).astype(jnp.float32), slot.reshape(-1),
                                 num_segments=slots + 1)[:slots]
    return sums.reshape(num_examples, num_responses), counts.reshape(num_examples, num_responses)


def per_response(token_values_RxT: Array, *, mask_RxT: Array, example_id: Array, response_id: Array,
                 num_examples: int, num_responses: int, packed: bool) -> tuple[Array, Array]:
    """[R, T] per-token values -> [B, K] masked sums and counts, for either row layout."""
    if packed:
        return reduce_packed(token_values_RxT, mask_RxT, example_id, response_id, num_examples, num_responses)
    return reduce_unpacked(token_values_RxT, mask_RxT, num_responses)


def last_token_states(hidden_RxTxD: Array, mask_RxT: Array, num_responses: int) -> Array:
    """[B, K, D] hidden state at each response's final token (reward heads; unpacked rows).

    `mask_RxT` is the shifted mask: position t is masked in when token t + 1 is
    scored, so the final response token sits one past the last masked position;
    its hidden state has read the whole response.
    """
    r, t, d = hidden_RxTxD.shape
    last = jnp.max(jnp.where(mask_RxT, jnp.arange(t)[None, :], -1), axis=1)
    read_at = jnp.clip(last + 1, 0, t - 1)
    states = jnp.take_along_axis(hidden_RxTxD, read_at[:, None, None], axis=1)[:, 0]
    return states.reshape(num_responses, r // num_responses, d).transpose(1, 0, 2)


def mismatched_rows(batch: dict[str, Array]) -> dict[str, Array]:
    """Unpacked single-response rows with each prompt followed by the next row's response.

    KTO estimates its KL baseline from such mismatched (x, y') pairs. Row b keeps
    its prompt (the tokens before its first scored token) and takes row b + 1's
    response (cyclically); a response that no longer fits is cut at the row end.
    """
    tokens, mask = batch["tokens"], batch["loss_mask"] > 0
    r, t = tokens.shape
    pos = jnp.arange(t)[None, :]
    prompt_len = jnp.where(jnp.any(mask, axis=1), jnp.argmax(mask, axis=1), jnp.sum(batch["segments"] > 0, axis=1))
    response_len = jnp.sum(mask, axis=1)
    src = (jnp.arange(r) + 1) % r
    p, p_src, n_src = prompt_len[:, None], prompt_len[src][:, None], response_len[src][:, None]
    in_prompt = pos < p
    in_response = (pos >= p) & (pos - p < n_src)
    from_src = jnp.take_along_axis(tokens[src], jnp.clip(p_src + pos - p, 0, t - 1), axis=1)
    new_tokens = jnp.where(in_prompt, tokens, jnp.where(in_response, from_src, 0))
    live = in_prompt | in_response
    return dict(batch, tokens=new_tokens, loss_mask=in_response.astype(jnp.float32),
                segments=live.astype(jnp.int32), positions=jnp.broadcast_to(pos, (r, t)).astype(jnp.int32))
