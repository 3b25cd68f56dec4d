"""Batched autoregressive sampling with a KV cache, as one jitted function.

    out = sampling.generate(graphdef, params, cfg, prompts_BxP, prompt_lengths_B,
                            max_new_tokens=64, rng=jax.random.key(0), top_p=0.9,
                            stop_tokens=(eos_id,))
    out.tokens_BxN, out.logps_BxN, out.lengths_B, out.done_B

Prompts are right-padded to a common length P, each row with its own length.
Cache layout: slots 0..P-1 hold the prompt (padding slots get segment id 0 and
are never attended); generated token t of every row goes to slot P + t with
position prompt_length + t. Positions, not slots, drive RoPE and the causal and
sliding-window masks (prefjax.models.attention), so rows of different prompt
lengths decode together without shifting anything.

Log-probs: `logps_BxN` is each sampled token's log-prob under the model's own
distribution (untempered, unfiltered softmax of the logits) -- what a policy-
gradient or preference loss wants. `sample_logps_BxN` is its log-prob under
the distribution actually sampled from (after temperature, top-k and top-p;
0 for greedy decoding). Both are 0 at positions after a row has stopped.

Mixture sampling (Nash-MD, Munos et al. 2023): with `mixture_params` (a second
set of weights for the same graphdef and cfg, e.g. the reference or a LoRA
policy's base) both models prefill their own KV caches and decode in lockstep,
each fed the same sampled token, and every token is drawn from the normalised
geometric mixture at coefficient c = `mixture_coef`

    log p_mix(. | ctx) = log_softmax((1 - c) * log_softmax(policy logits)
                                     + c * log_softmax(partner logits))

(the paper's pi^(1-beta) * pi_ref^beta, token by token). Temperature, top-k and
top-p then apply to the mixture's logits; `logps_BxN` is the mixture's own
(untempered) log-prob and `policy_logps_BxN` the first model's. The cost is one
more KV cache and one more forward per token; the weights are not copied.

Everything runs inside one `jax.jit` (the model, the sampling settings and the
number of new tokens are static; the mixture coefficient is traced); it runs sharded under
`with sharding.use_mesh(mesh):` with the batch sharded over ("data", "fsdp").
The decode loop is a `jax.lax.while_loop` that also ends early once every row
has emitted a stop token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax import models, sharding
from prefjax.models.config import ModelConfig
from prefjax.models.params import Params

Array = jax.Array


class SampleOutput(NamedTuple):
    """What `generate` returns (N = max_new_tokens).

    Attributes:
      tokens_BxN: int32 generated tokens; pad_id after a row's first stop token.
      logps_BxN: float32 log-prob of each token under the untempered, unfiltered
        model distribution; 0 after the row has stopped.
      sample_logps_BxN: float32 log-prob under the sampling distribution
        (temperature, top-k, top-p applied); 0 for greedy and after stopping.
      lengths_B: int32 number of tokens generated up to and including the first
        stop token (N when no stop token was emitted).
      done_B: bool, whether the row emitted a stop token.
      policy_logps_BxN: with a mixture, float32 log-prob of each token under the
        first model (`params`) alone, untempered; 0 after stopping. None without.

    With a mixture, `logps_BxN` is the mixture distribution's log-prob (see
    `mixture_logits`) and `sample_logps_BxN` the tempered, filtered mixture's.
    """

    tokens_BxN: Array
    logps_BxN: Array
    sample_logps_BxN: Array
    lengths_B: Array
    done_B: Array
    policy_logps_BxN: Optional[Array] = None


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static sampling settings (hashable, so they key the jit cache).

    temperature 0 is greedy decoding. top_k keeps the k most likely tokens;
    top_p keeps the smallest set of most likely tokens whose probability mass
    is >= top_p (always at least one; tokens tied at the boundary are kept
    together). Temperature is applied first, then
    top-k, then top-p on the renormalised remainder (the Hugging Face order).
    """

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def nucleus_filter(logits_BxV: Array, top_p: Array | float) -> Array:
    """Masks (to -inf) all but the smallest set of most likely tokens whose mass is >= top_p.

    The set is {tokens with probability >= t} for the largest threshold t that
    still leaves mass >= top_p; t is found by bisection on the bit patterns of
    non-negative float32 numbers (monotone in the value), which is exact after
    32 halvings. This avoids sorting the vocabulary, which is slow on CPU and
    TPU. The most likely token is always kept; tokens tied with the last one
    kept are all kept. top_p may be traced.
    """
    probs = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)

    def mass_at_least(bits_B: Array) -> Array:
        threshold = jax.lax.bitcast_convert_type(bits_B, jnp.float32)[:, None]
        return jnp.sum(jnp.where(probs >= threshold, probs, 0.0), axis=-1)

    def halve(_, bounds):
        # Invariant: mass(lo) >= top_p (lo starts at 0.0: all the mass) and
        # mass(hi) < top_p (hi starts just above the largest probability: none).
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = mass_at_least(mid) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo = jnp.zeros(probs.shape[:-1], jnp.int32)
    hi = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32) + 1
    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    keep = probs >= jax.lax.bitcast_convert_type(lo, jnp.float32)[:, None]
    return jnp.where(keep, logits_BxV, -jnp.inf)


def sample_tokens(logits_BxV: Array, rng: Array, settings: SamplingSettings) -> tuple[Array, Array]:
    """(tokens [B] int32, log-prob of each under the sampling distribution [B] float32).

    Every row draws from its own slice of the key's random stream, so a row's
    sample does not depend on the other rows' logits.
    """
    logits = logits_BxV.astype(jnp.float32)
    if settings.is_greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, jnp.zeros(tokens.shape, jnp.float32)
    candidates, token_ids = logits / settings.temperature, None
    if settings.top_k is not None and settings.top_k < candidates.shape[-1]:
        # Sampling among the k best is also cheaper than over the whole vocabulary.
        candidates, token_ids = jax.lax.top_k(candidates, settings.top_k)
    if settings.top_p is not None and settings.top_p < 1.0:
        candidates = nucleus_filter(candidates, settings.top_p)
    choice = jax.random.categorical(rng, candidates, axis=-1).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(candidates, axis=-1), choice[:, None], axis=-1)[:, 0]
    if token_ids is not None:
        choice = jnp.take_along_axis(token_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return choice, logp


def mixture_logits(policy_logits_BxV: Array, partner_logits_BxV: Array, coef: Array | float) -> Array:
    """Logits of the normalised geometric mixture p^(1 - coef) * q^coef (float32, unnormalised).

    Equal, up to a per-row constant, to (1 - c) * log_softmax(p) + c * log_softmax(q).
    It is written as the nearer end's own logits plus c (or 1 - c) times the
    difference of the log-softmaxes, so that c = 0 gives the policy's logits and
    c = 1 the partner's bit for bit: sampling from them then equals sampling
    from that model alone with the same key. coef may be traced.
    """
    policy = policy_logits_BxV.astype(jnp.float32)
    partner = partner_logits_BxV.astype(jnp.float32)
    delta = jax.nn.log_softmax(partner, axis=-1) - jax.nn.log_softmax(policy, axis=-1)
    coef = jnp.asarray(coef, jnp.float32)
    return jnp.where(coef <= 0.5, policy + coef * delta, partner - (1.0 - coef) * delta)


def _token_logp(logits_BxV: Array, tokens_B: Array) -> Array:
    """Each row's token's log-prob under softmax(logits) (float32)."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1),
                               tokens_B[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class _Static:
    max_new_tokens: int
    sampling: SamplingSettings
    stop_tokens: tuple[int, ...]
    pad_id: int
    cache_dtype: Optional[str]


class _LoopState(NamedTuple):
    step: Array  # index of the next token to emit
    logits_BxV: Array  # the model's logits for that token
    cache: models.Cache
    tokens_BxN: Array
    logps_BxN: Array
    sample_logps_BxN: Array
    lengths_B: Array
    done_B: Array
    # With a mixture only (None otherwise): the partner's logits and cache, the policy's log-probs.
    partner_logits_BxV: Optional[Array] = None
    partner_cache: Optional[models.Cache] = None
    policy_logps_BxN: Optional[Array] = None


def _constrain_cache(cache: models.Cache) -> models.Cache:
    return [{name: sharding.constrain(x, models.CACHE_LOGICAL_AXES[name]) for name, x in layer.items()}
            for layer in cache]


def _last_position_logits(model: models.Transformer, hidden_BxTxD: Array, index_B: Array) -> Array:
    """[B, V] logits at one position per row; the hidden state is sliced before unembedding."""
    hidden_Bx1xD = jnp.take_along_axis(hidden_BxTxD, index_B[:, None, None], axis=1)
    return model.logits(hidden_Bx1xD)[:, 0]


def _prefill(model: models.Transformer, cfg: ModelConfig, prompts_BxP: Array, lengths_B: Array,
             cache_len: int, cache_dtype: Optional[str]) -> tuple[Array, models.Cache]:
    """One forward over the padded prompts, writing cache slots 0..P-1; logits for the first new token."""
    b, p = prompts_BxP.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    segments = (positions < lengths_B[:, None]).astype(jnp.int32)
    cache = _constrain_cache(models.init_cache(cfg, b, cache_len, cache_dtype))
    hidden, cache = model(prompts_BxP, positions_BxT=positions, segments_BxT=segments, cache=cache,
                          cache_index=jnp.int32(0))
    return _last_position_logits(model, hidden, lengths_B - 1), _constrain_cache(cache)


def _decode_one(model: models.Transformer, tokens_B: Array, positions_B: Array, cache: models.Cache,
                slot: Array) -> tuple[Array, models.Cache]:
    """Feeds one token per row at cache slot `slot`; logits for the next token."""
    segments = jnp.ones((tokens_B.shape[0], 1), jnp.int32)
    hidden, cache = model(tokens_B[:, None], positions_BxT=positions_B[:, None], segments_BxT=segments,
                          cache=cache, cache_index=slot)
    return model.logits(hidden)[:, 0], _constrain_cache(cache)


def _emit(state: _LoopState, rng: Array, static: _Static,
          mixture_coef: Optional[Array] = None) -> tuple[_LoopState, Array]:
    """Samples token `state.step` for every row and records it; returns the new state and the token to feed.

    Rows that have stopped record pad_id, but the model is fed the sampled token
    (always a valid id, whatever pad_id is); their later outputs are discarded.
    With a partner (state.partner_logits_BxV) the token is drawn from the mixture.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    logits = state.logits_BxV
    if state.partner_logits_BxV is not None:
        logits = mixture_logits(state.logits_BxV, state.partner_logits_BxV, mixture_coef)
    sampled, sample_logp = sample_tokens(logits, step_rng, static.sampling)
    model_logp = _token_logp(logits, sampled)
    active = ~state.done_B
    token = jnp.where(active, sampled, jnp.int32(static.pad_id))
    done = state.done_B
    if static.stop_tokens:
        done = done | (active & jnp.isin(sampled, jnp.asarray(static.stop_tokens, jnp.int32)))

    def put(buffer_BxN: Array, column_B: Array) -> Array:
        return jax.lax.dynamic_update_slice_in_dim(buffer_BxN, column_B[:, None].astype(buffer_BxN.dtype),
                                                   state.step, axis=1)

    zero = jnp.float32(0.0)
    state = state._replace(
        tokens_BxN=put(state.tokens_BxN, token),
        logps_BxN=put(state.logps_BxN, jnp.where(active, model_logp, zero)),
        sample_logps_BxN=put(state.sample_logps_BxN, jnp.where(active, sample_logp, zero)),
        lengths_B=state.lengths_B + active.astype(jnp.int32),
        done_B=done,
    )
    if state.policy_logps_BxN is not None:
        policy_logp = jnp.where(active, _token_logp(state.logits_BxV, sampled), zero)
        state = state._replace(policy_logps_BxN=put(state.policy_logps_BxN, policy_logp))
    return state, sampled


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "static"))
def _generate(params: Params, mixture_params: Optional[Params], mixture_coef: Array, prompts_BxP: Array,
              lengths_B: Array, rng: Array, *, graphdef: nnx.GraphDef, cfg: ModelConfig,
              static: _Static) -> SampleOutput:
    n = static.max_new_tokens
    b, p = prompts_BxP.shape
    mixed = mixture_params is not None
    model = nnx.merge(graphdef, params)
    partner = nnx.merge(graphdef, mixture_params) if mixed else None
    prompts_BxP = sharding.constrain(prompts_BxP.astype(jnp.int32), ("batch", "length"))
    lengths_B = sharding.constrain(lengths_B.astype(jnp.int32), ("batch",))
    # The last emitted token is never fed back, so N - 1 decode slots suffice.
    logits, cache = _prefill(model, cfg, prompts_BxP, lengths_B, p + n - 1, static.cache_dtype)
    partner_logits, partner_cache = None, None
    if mixed:  # the partner's own cache over the same prompts
        partner_logits, partner_cache = _prefill(partner, cfg, prompts_BxP, lengths_B, p + n - 1,
                                                 static.cache_dtype)

    def buffer(value: Any, dtype: Any) -> Array:
        return sharding.constrain(jnp.full((b, n), value, dtype), ("batch", "length"))

    state = _LoopState(
        step=jnp.int32(0), logits_BxV=logits, cache=cache,
        tokens_BxN=buffer(static.pad_id, jnp.int32), logps_BxN=buffer(0.0, jnp.float32),
        sample_logps_BxN=buffer(0.0, jnp.float32),
        lengths_B=sharding.constrain(jnp.zeros((b,), jnp.int32), ("batch",)),
        done_B=sharding.constrain(jnp.zeros((b,), bool), ("batch",)),
        partner_logits_BxV=partner_logits, partner_cache=partner_cache,
        policy_logps_BxN=buffer(0.0, jnp.float32) if mixed else None,
    )
    coef = mixture_coef if mixed else None

    def keep_going(state: _LoopState) -> Array:
        return (state.step < n - 1) & ~jnp.all(state.done_B)

    def step(state: _LoopState) -> _LoopState:
        state, token = _emit(state, rng, static, coef)
        positions, slot = lengths_B + state.step, p + state.step
        logits, cache = _decode_one(model, token, positions, state.cache, slot)
        state = state._replace(step=state.step + 1, logits_BxV=logits, cache=cache)
        if mixed:  # the partner reads the same token, into its own cache
            partner_logits, partner_cache = _decode_one(partner, token, positions, state.partner_cache, slot)
            state = state._replace(partner_logits_BxV=partner_logits, partner_cache=partner_cache)
        return state

    state = jax.lax.while_loop(keep_going, step, state)
    # The last token (or pads, when every row stopped early) comes from the final logits.
    state, _ = _emit(state, rng, static, coef)
    rows = ("batch", "length")
    return SampleOutput(
        tokens_BxN=sharding.constrain(state.tokens_BxN, rows),
        logps_BxN=sharding.constrain(state.logps_BxN, rows),
        sample_logps_BxN=sharding.constrain(state.sample_logps_BxN, rows),
        lengths_B=sharding.constrain(state.lengths_B, ("batch",)),
        done_B=sharding.constrain(state.done_B, ("batch",)),
        policy_logps_BxN=sharding.constrain(state.policy_logps_BxN, rows) if mixed else None,
    )


def _check_inputs(prompts_BxP: Any, prompt_lengths_B: Any, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(np.shape(prompts_BxP)) != 2:
        raise ValueError(f"prompts must be [B, P], got shape {np.shape(prompts_BxP)}")
    b, p = np.shape(prompts_BxP)
    if np.shape(prompt_lengths_B) != (b,):
        raise ValueError(f"prompt_lengths must be [B] = [{b}], got shape {np.shape(prompt_lengths_B)}")
    # Values are checked when they are concrete and local (a [B] transfer); under
    # an outer jit or across hosts the caller is trusted.
    traced = isinstance(prompt_lengths_B, jax.core.Tracer)
    if traced or not getattr(prompt_lengths_B, "is_fully_addressable", True):
        return
    lengths = np.asarray(prompt_lengths_B)
    if lengths.min() < 1 or lengths.max() > p:
        raise ValueError(f"prompt lengths must be in [1, P={p}], "
                         f"got min {lengths.min()}, max {lengths.max()}")


def _check_mixture(params: Params, mixture_params: Params, mixture_coef: Any) -> None:
    """The partner must fit the same graphdef (same tree and shapes); a concrete coefficient is in [0, 1]."""
    ours, theirs = _leaf_shapes(params), _leaf_shapes(mixture_params)
    for name in sorted(ours.keys() | theirs.keys()):
        if ours.get(name) != theirs.get(name):
            have = {which: "nothing" if shape is None else f"shape {shape}"
                    for which, shape in (("ours", ours.get(name)), ("theirs", theirs.get(name)))}
            raise ValueError(f"mixture_params must be weights of the same model as params (same graphdef and "
                             f"cfg; a LoRA policy's partner is its base weights), but at {name} params has "
                             f"{have['ours']} and mixture_params has {have['theirs']}")
    if isinstance(mixture_coef, jax.core.Tracer):
        return
    coef = float(np.asarray(mixture_coef))
    if not 0.0 <= coef <= 1.0:  # also rejects NaN
        raise ValueError(f"mixture_coef must be in [0, 1] (0 = the policy alone, 1 = the partner alone), "
                         f"got {coef}")


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): np.shape(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def generate(graphdef: nnx.GraphDef, params: Params, cfg: ModelConfig, prompts_BxP: Array,
             prompt_lengths_B: Array, *, max_new_tokens: int, rng: Array, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, greedy: bool = False,
             stop_tokens: Sequence[int] = (), pad_id: int = 0, cache_dtype: Optional[str] = None,
             mixture_params: Optional[Params] = None, mixture_coef: Array | float = 0.5,
             ) -> SampleOutput:
    """Samples up to `max_new_tokens` tokens after each right-padded prompt (see module docstring).

    Args:
      graphdef, params, cfg: the model (`models.init_params(cfg, ...)`); params may be sharded.
      prompts_BxP: int tokens, right-padded; prompt_lengths_B: real lengths, each in [1, P].
      max_new_tokens: N, static.
      rng: a PRNG key; the same key gives the same samples.
      temperature, top_k, top_p, greedy: see SamplingSettings (temperature 0 is greedy).
      stop_tokens: ids that end a row (the stop token is kept and counted in lengths_B).
      pad_id: written after a row has stopped.
      cache_dtype: KV cache dtype name ("bfloat16", ...); default cfg.dtype.
      mixture_params: optional second weights for the same graphdef and cfg (the reference, a
        LoRA policy's base): sample from the token-level geometric mixture with them (module
        docstring); fills `policy_logps_BxN`. Both caches use cache_dtype.
      mixture_coef: c in [0, 1], the partner's exponent (0 = the policy alone, 1 = the partner
        alone). Traced: changing it does not recompile. Ignored without mixture_params.
    """
    _check_inputs(prompts_BxP, prompt_lengths_B, max_new_tokens)
    if mixture_params is not None:
        _check_mixture(params, mixture_params, mixture_coef)
    static = _Static(
        max_new_tokens=int(max_new_tokens),
        sampling=SamplingSettings(temperature=float(temperature), top_k=top_k, top_p=top_p,
                                  greedy=bool(greedy)),
        stop_tokens=tuple(int(s) for s in stop_tokens), pad_id=int(pad_id), cache_dtype=cache_dtype,
    )
    return _generate(params, mixture_params, jnp.asarray(mixture_coef, jnp.float32), jnp.asarray(prompts_BxP),
                     jnp.asarray(prompt_lengths_B), rng, graphdef=graphdef, cfg=cfg, static=static)
