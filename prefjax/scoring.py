"""One scoring function: a model over a batch of responses -> per-response log-probs, KL or rewards.

    scores = score(Model(cfg, graphdef), params, batch)                    # logps, lengths [B, K]
    scores = score(model, params, batch, what=("token_kl",), reference=ref_params)
    scores = score(model, params, batch, what=("rewards",), reward_head=head)  # rewards [B, K, L]

The train step (policy and reference), evaluation, the precomputed reference cache,
KTO's mismatched pairs and the quick start's sampler and evaluator all score through
here. What it computes:

- "logps" (always): the model's forward over the batch's rows, per-token label log-probs
  tile by tile (prefjax.logprobs: no [R, T, V] logits), and their sums and counts per
  response, `logps` and `lengths` [B, K]; for unpacked rows also the per-token arrays
  [K, B, T] (`token_logps`, `token_mask`: a reshape, no extra work);
- "token_kl": with `reference` params, the reference's log-probs (`ref_logps`) and the
  per-token KL(reference || model) over the whole vocabulary [K, B, T] (TDPO), both
  models in one pass over the vocabulary; the reference gets no gradient;
- "rewards": a linear reward head [D, L] on the hidden state of each response's last
  real token (`last_token_positions`: its EOS / end-of-turn token, never a pad), `rewards`
  [B, K, L], for every row layout. Asked for without "logps", the unembedding is skipped
  (a reward model never reads its LM head): `logps` is None then, `lengths` still filled.

The model's hidden state at position t predicts token t + 1, so labels, masks and ids
are shifted by one (`prefjax.logprobs.shift_labels`). In prefix-shared rows a response
token is predicted by the token before it on its own branch (`shared_prefix_targets`).
Sums per response: unpacked rows reshape to [K, B, T]; packed and prefix-shared rows sum
by the slot example_id * K + response_id.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Collection, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from prefjax import late_zeros, logprobs, models
from prefjax.batch import Batch
from prefjax.models.config import ModelConfig

Array = jax.Array
WHAT = ("logps", "token_kl", "rewards")


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How per-token log-probs are tiled (prefjax.logprobs.token_logps): positions per tile,
    vocabulary columns per tile (None: all), most tokens per tile on one device (None: no limit)."""

    chunk: int = 256
    vocab_chunk: Optional[int] = None
    tile_tokens: Optional[int] = 512


@dataclasses.dataclass(frozen=True)
class Model:
    """What scoring needs to know of a model besides its parameters (static, hashable)."""

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    tiling: Tiling = Tiling()

    def hidden(self, params: Any, batch: Batch) -> Array:
        """Final hidden states [R, T, D] of `params` over the batch's rows."""
        hidden, _ = models.apply(self.graphdef, params, batch.tokens, positions_BxT=batch.positions,
                                 segments_BxT=batch.segments, branches_BxT=batch.branches)
        return hidden

    def forward(self, params: Any, batch: Batch) -> tuple[Array, Array]:
        """(final hidden states [R, T, D], unembedding [D, V]) of `params` over the batch's rows."""
        return self.hidden(params, batch), models.unembedding(self.graphdef, params)

    def tile_options(self) -> dict[str, Any]:
        t = self.tiling
        return dict(chunk_size=t.chunk, vocab_chunk_size=t.vocab_chunk, tile_tokens=t.tile_tokens,
                    logit_softcap=self.cfg.final_logit_softcap)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scores:
    """Per-response sums [B, K] and, where asked for, per-token arrays [K, B, T] and rewards [B, K]."""

    logps: Optional[Array]  # None when only "rewards" were asked for
    lengths: Array
    ref_logps: Optional[Array] = None
    token_logps: Optional[Array] = None
    token_mask: Optional[Array] = None
    token_kl: Optional[Array] = None
    kl_logps: Optional[Array] = None  # KTO: policy log-probs of mismatched (x, y') [B]
    ref_kl_logps: Optional[Array] = None
    rewards: Optional[Array] = None  # reward-model head outputs [B, K, L]

    def replace(self, **fields: Any) -> "Scores":
        return dataclasses.replace(self, **fields)


def score(model: Model, params: Any, batch: Batch, *, what: Collection[str] = ("logps",),
          reference: Any = None, reward_head: Optional[Array] = None) -> Scores:
    """`model` with `params` over `batch`: the quantities of the module docstring named in `what`.

    Traceable (call it inside jit). Gradients flow into `params` (and `reward_head`); wrap
    `params` in jax.lax.stop_gradient to score without them.
    """
    unknown = sorted(set(what) - set(WHAT))
    if unknown:
        raise ValueError(f"score: unknown quantities {unknown}; choose from {WHAT}")
    if "token_kl" in what and batch.by_slot:
        raise ValueError(f"score: 'token_kl' needs unpacked rows; this batch is {batch.layout!r}")
    if "token_kl" in what and reference is None:
        raise ValueError("score: 'token_kl' needs the reference's params (reference=...)")
    if "rewards" in what and reward_head is None:
        raise ValueError("score: 'rewards' needs a reward head (reward_head=...)")
    align, labels, mask, example_id, response_id = targets(batch)
    reduce = functools.partial(per_response, mask_RxT=mask, example_id=example_id, response_id=response_id,
                               num_examples=batch.num_examples, num_responses=batch.num_responses,
                               packed=batch.by_slot)
    if set(what) == {"rewards"}:
        hidden = model.hidden(params, batch)
        _, lengths = reduce(jnp.zeros(mask.shape, jnp.float32))
        return Scores(logps=None, lengths=lengths, rewards=rewards_at_last_tokens(hidden, batch, reward_head))
    options = model.tile_options()
    hidden, unembed = model.forward(params, batch)
    aligned = align(hidden)
    ref_tok = token_kl = None
    if "token_kl" in what:
        ref_hidden, ref_unembed = model.forward(jax.lax.stop_gradient(reference), batch)
        both = logprobs.token_logps_and_kl(aligned, unembed, align(ref_hidden), ref_unembed, labels, mask, **options)
        tok, ref_tok, token_kl = both.policy_logps, both.ref_logps, both.kl
    else:
        tok = logprobs.token_logps(aligned, unembed, labels, mask_BxT=mask, **options)
    sums, lengths = reduce(tok)
    fields: dict[str, Any] = dict(logps=sums, lengths=lengths)
    if ref_tok is not None:
        fields["ref_logps"] = jax.lax.stop_gradient(reduce(ref_tok)[0])
    if not batch.by_slot:
        k, b, t = batch.num_responses, batch.num_examples, tok.shape[1]
        fields.update(token_logps=tok.reshape(k, b, t), token_mask=mask.reshape(k, b, t))
        if token_kl is not None:
            fields["token_kl"] = token_kl.reshape(k, b, t)
    if "rewards" in what:
        fields["rewards"] = rewards_at_last_tokens(hidden, batch, reward_head)
    return Scores(**fields)


# ---------------------------------------------------------------------------------------------
# Targets: which hidden state predicts which token


def targets(batch: Batch) -> tuple[Callable[[Array], Array], Array, Array, Array, Array]:
    """(hidden -> hidden aligned with the targets, labels, mask, example_id, response_id), each [R, T]."""
    if batch.layout == "shared_prefix":
        source, labels, mask, example_id, response_id = shared_prefix_targets(batch)
        return (lambda h: at_sources(h, source)), labels, mask, example_id, response_id
    labels, mask, example_id, response_id = shifted(batch)
    return (lambda h: h), labels, mask, example_id, response_id


def shifted(batch: Batch) -> tuple[Array, Array, Array, Array]:
    """(labels, mask, example_id, response_id), each [R, T], aligned with hidden states."""
    labels, mask = logprobs.shift_labels(batch.tokens, batch.loss_mask > 0)

    def shift(x: Array) -> Array:
        return jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], -1)], axis=1)

    return labels, mask, shift(batch.example_id), shift(batch.response_id)


def shared_prefix_targets(batch: Batch) -> tuple[Array, ...]:
    """(source, labels, mask, example_id, response_id), each [R, T], for prefix-shared rows.

    Token t is predicted by the hidden state of the token before it on its own
    branch (prefjax.data.prefix_sharing): the previous token of the same
    response, or the last prefix token for a response's first token. `source`
    holds that index (-1: none; such tokens are masked out); labels, mask and
    ids are the token's own, unshifted.
    """
    branches, tokens = batch.branches, batch.tokens
    live = batch.segments > 0
    index = jnp.arange(tokens.shape[1])[None, :]

    def last_before(where: Array) -> Array:
        latest = jax.lax.cummax(jnp.where(where, index, -1), axis=1)
        return jnp.concatenate([jnp.full_like(latest[:, :1], -1), latest[:, :-1]], axis=1)

    prefix = last_before(live & (branches == 0))
    source = prefix
    for k in range(1, batch.num_responses + 1):
        own = jnp.maximum(prefix, last_before(live & (branches == k)))
        source = jnp.where(branches == k, own, source)
    mask = (batch.loss_mask > 0) & (source >= 0) & live
    return source, tokens, mask, batch.example_id, batch.response_id


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


# ---------------------------------------------------------------------------------------------
# Per-token values -> per-response sums


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


def last_token_positions(batch: Batch) -> Array:
    """[B, K] flat index (row * T + position) of each response's last real token.

    The one place that decides where a reward is read: the final scored token of the
    response (its EOS or end-of-turn token, which prefjax.data.tokenize appends or keeps),
    whose hidden state has read the whole prompt and response; pads are never scored, so
    never read. Unpacked, packed and prefix-shared rows alike: the batch's own (unshifted)
    loss mask and example/response ids say which tokens belong to which response. A
    response with no scored token (a filler example) reads position 0 of its row.
    """
    r, t = batch.tokens.shape
    k, b = batch.num_responses, batch.num_examples
    flat = jnp.arange(r * t, dtype=jnp.int32).reshape(r, t)
    scored = batch.loss_mask > 0
    if batch.by_slot:
        slots = b * k
        slot = jnp.where(scored, batch.example_id * k + batch.response_id, slots)
        last = jax.ops.segment_max(jnp.where(scored, flat, -1).reshape(-1), slot.reshape(-1),
                                   num_segments=slots + 1)[:slots]
        return jnp.maximum(last, 0).reshape(b, k)
    # unpacked: row j * B + i holds response j of example i
    last = jnp.max(jnp.where(scored, flat, -1), axis=1)
    fallback = jnp.arange(r, dtype=jnp.int32) * t
    last = jnp.where(last >= 0, last, fallback)
    return last.reshape(k, b).T


def rewards_at_last_tokens(hidden_RxTxD: Array, batch: Batch, head_DxL: Array) -> Array:
    """[B, K, L] float32 rewards: the head on each response's last real token's hidden state."""
    r, t, d = hidden_RxTxD.shape
    positions = last_token_positions(batch)  # [B, K]
    if batch.by_slot:
        states = jnp.take(hidden_RxTxD.reshape(r * t, d), positions, axis=0)  # [B, K, D]
    else:
        # one position per row: a gather inside each row, which stays on the row's shard
        k, b = batch.num_responses, batch.num_examples
        in_row = (positions.T.reshape(r) % t)[:, None, None]
        states = jnp.take_along_axis(hidden_RxTxD, in_row, axis=1)[:, 0].reshape(k, b, d).transpose(1, 0, 2)
    head = head_DxL.reshape(d, -1).astype(jnp.float32)
    return jnp.einsum("bkd,dl->bkl", states.astype(jnp.float32), head)


# ---------------------------------------------------------------------------------------------
# Mismatched pairs (KTO's KL baseline)


def mismatched(batch: Batch) -> Batch:
    """Unpacked single-response rows with each prompt followed by the next row's response.

    KTO estimates its KL baseline from such mismatched (x, y') pairs. Row b keeps
    its prompt (the tokens before its first scored token) and takes row b + 1's
    response (cyclically); a response that no longer fits is cut at the row end.
    """
    tokens, mask = batch.tokens, batch.loss_mask > 0
    r, t = tokens.shape
    pos = jnp.arange(t)[None, :]
    prompt_len = jnp.where(jnp.any(mask, axis=1), jnp.argmax(mask, axis=1), jnp.sum(batch.segments > 0, axis=1))
    response_len = jnp.sum(mask, axis=1)
    src = (jnp.arange(r) + 1) % r
    p, p_src, n_src = prompt_len[:, None], prompt_len[src][:, None], response_len[src][:, None]
    in_prompt = pos < p
    in_response = (pos >= p) & (pos - p < n_src)
    from_src = jnp.take_along_axis(tokens[src], jnp.clip(p_src + pos - p, 0, t - 1), axis=1)
    new_tokens = jnp.where(in_prompt, tokens, jnp.where(in_response, from_src, 0))
    live = in_prompt | in_response
    return batch.replace(tokens=new_tokens, loss_mask=in_response.astype(jnp.float32),
                         segments=live.astype(jnp.int32), positions=jnp.broadcast_to(pos, (r, t)).astype(jnp.int32))
