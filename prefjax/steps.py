"""The pure train and eval steps, and the one helper that jits them with shardings.

One train step is one XLA program: every response row of the batch (chosen
and rejected, or K ranked, or single unpaired responses) goes through the
policy in one forward; the reference forward runs in the same program under
stop_gradient; the loss comes from the registry; gradient accumulation is a
scan over micro-batches inside the program; the optimizer update, the loss's
carried state, TR-DPO reference updates and the NaN guard happen before the
program returns. Metrics come back as device scalars (the loop fetches them
one step late).

A step whose loss or gradient norm is not finite leaves params, optimizer
state and loss state unchanged and counts itself in `nonfinite_steps`; the
loop then stops the run or carries on, as the config says.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prefjax import logprobs, loss_inputs, models, response_logps
from prefjax.losses import registry, types
from prefjax.models import lora as lora_lib
from prefjax.models.config import ModelConfig
from prefjax.state import TrainState

Array = jax.Array
Batch = dict[str, Array]
REFERENCES = ("frozen", "lora", "precomputed", "none")
REF_UPDATES = ("none", "soft", "hard")
PER_EXAMPLE_KEYS = ("weight", "scores", "margin", "label", "ref_logps")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the step (a hashable jit argument).

    packed: rows hold several sequences (segment ids); per-response sums by slot.
    shared_prefix: rows are prefix-shared (prefjax.data.prefix_sharing: one row
      per example, `branches` in the batch); reduced like packed rows.
    reference: "frozen" (a separate copy of the initial policy), "lora" (the
      base model with adapters disabled), "precomputed" (batch["ref_logps"]
      [B, K] from the reference cache), or "none" (reference-free losses).
    ref_update: "soft" (TR-DPO: ref <- alpha * policy + (1 - alpha) * ref) or
      "hard" (ref <- policy; also "previous iterate") every `ref_update_every`
      steps; the moving reference then lives in TrainState.ref_params.
    """

    loss_name: str
    loss_hparams: tuple[tuple[str, Any], ...]
    num_responses: int
    packed: bool = False
    shared_prefix: bool = False
    grad_accum: int = 1
    reference: str = "frozen"
    ref_update: str = "none"
    ref_update_every: int = 1
    ref_alpha: float = 0.5
    columns: loss_inputs.Columns = loss_inputs.Columns()
    logprob_chunk: int = 256
    vocab_chunk: Optional[int] = None
    logprob_tile_tokens: Optional[int] = 512
    lora: Optional[lora_lib.LoraConfig] = None

    @property
    def loss(self) -> registry.LossSpec:
        return registry.get(self.loss_name)

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.loss_hparams)

    @property
    def token_level(self) -> bool:
        return "chosen_token_kl" in self.loss.requires

    @property
    def reward_model(self) -> bool:
        return self.loss.inputs in (types.RewardPair, types.RatedResponses)

    @property
    def mismatched_pairs(self) -> bool:
        return "kl_logps" in self.loss.requires


# ---------------------------------------------------------------------------
# Forward passes and per-response log-probs
# ---------------------------------------------------------------------------

def policy_params(spec: StepSpec, trainable: dict[str, Any], frozen: Any) -> Any:
    """The policy's model params: the trained ones, or the LoRA base with adapters applied."""
    if spec.lora is not None:
        return lora_lib.apply_lora(frozen, trainable["adapters"], spec.lora)
    return trainable["model"]


def reference_params(spec: StepSpec, state: TrainState, frozen: Any) -> Any:
    """The reference model's params, or None when the reference is precomputed or absent."""
    if spec.ref_update != "none":
        return state.ref_params
    if spec.reference in ("frozen", "lora"):
        return frozen  # the frozen copy, or the LoRA base (= adapters disabled)
    return None


def _forward(graphdef: nnx.GraphDef, params: Any, rows: Batch) -> tuple[Array, Array]:
    hidden, _ = models.apply(graphdef, params, rows["tokens"], positions_BxT=rows["positions"],
                             segments_BxT=rows["segments"], branches_BxT=rows.get("branches"))
    return hidden, models.unembedding(graphdef, params)


def _targets(spec: StepSpec, mb: Batch) -> tuple[Callable[[Array], Array], Array, Array, Array, Array]:
    """(hidden -> hidden aligned with the targets, labels, mask, example_id, response_id)."""
    if spec.shared_prefix:
        source, labels, mask, example_id, response_id = response_logps.shared_prefix_targets(mb, spec.num_responses)
        return (lambda h: response_logps.at_sources(h, source)), labels, mask, example_id, response_id
    labels, mask, example_id, response_id = response_logps.shifted(mb)
    return (lambda h: h), labels, mask, example_id, response_id


def responses(spec: StepSpec, cfg: ModelConfig, graphdef: nnx.GraphDef, params: Any, ref_params: Any,
              mb: Batch, reward_head: Optional[Array] = None) -> loss_inputs.Responses:
    """Policy (and reference) log-probs per response of one micro-batch."""
    align, labels, mask, example_id, response_id = _targets(spec, mb)
    b, k = mb["weight"].shape[0], spec.num_responses
    kw = dict(chunk_size=spec.logprob_chunk, vocab_chunk_size=spec.vocab_chunk,
              tile_tokens=spec.logprob_tile_tokens,
              logit_softcap=cfg.final_logit_softcap)
    hidden, unembed = _forward(graphdef, params, mb)
    hidden = align(hidden)
    ref_tok = token_kl = None
    if spec.token_level:
        ref_hidden, ref_unembed = _forward(graphdef, jax.lax.stop_gradient(ref_params), mb)
        both = logprobs.token_logps_and_kl(hidden, unembed, align(ref_hidden), ref_unembed, labels, mask, **kw)
        tok, ref_tok, token_kl = both.policy_logps, both.ref_logps, both.kl
    else:
        tok = logprobs.token_logps(hidden, unembed, labels, mask_BxT=mask, **kw)
        if ref_params is not None:
            ref_hidden, ref_unembed = _forward(graphdef, jax.lax.stop_gradient(ref_params), mb)
            ref_tok = jax.lax.stop_gradient(logprobs.token_logps(align(ref_hidden), ref_unembed, labels,
                                                                 mask_BxT=mask, **kw))

    by_slot = spec.packed or spec.shared_prefix
    reduce = functools.partial(response_logps.per_response, mask_RxT=mask, example_id=example_id,
                               response_id=response_id, num_examples=b, num_responses=k, packed=by_slot)
    sums, lengths = reduce(tok)
    ref_sums = None
    if ref_tok is not None:
        ref_sums = jax.lax.stop_gradient(reduce(ref_tok)[0])
    elif spec.reference == "precomputed":
        ref_sums = mb["ref_logps"]
    fields: dict[str, Any] = dict(logps=sums, lengths=lengths, ref_logps=ref_sums)
    if not by_slot:
        t = tok.shape[1]
        fields.update(token_logps=tok.reshape(k, b, t), token_mask=mask.reshape(k, b, t))
        if token_kl is not None:
            fields["token_kl"] = token_kl.reshape(k, b, t)
    if spec.reward_model:
        states = response_logps.last_token_states(hidden, mask, k)  # [B, K, D]
        fields["rewards"] = jnp.einsum("bkd,d->bk", states.astype(jnp.float32), reward_head.astype(jnp.float32))
    if spec.mismatched_pairs:
        fields.update(_mismatched_logps(spec, cfg, graphdef, params, ref_params, mb))
    return loss_inputs.Responses(**fields)


def _mismatched_logps(spec: StepSpec, cfg: ModelConfig, graphdef: nnx.GraphDef, params: Any, ref_params: Any,
                      mb: Batch) -> dict[str, Array]:
    """KTO's KL-baseline inputs: log-probs of each prompt with another row's response (no gradient)."""
    rows = response_logps.mismatched_rows(mb)
    labels, mask, _, _ = response_logps.shifted(rows)
    kw = dict(chunk_size=spec.logprob_chunk, vocab_chunk_size=spec.vocab_chunk,
              tile_tokens=spec.logprob_tile_tokens,
              logit_softcap=cfg.final_logit_softcap)
    out = {}
    for name, p in (("kl_logps", params), ("ref_kl_logps", ref_params)):
        hidden, unembed = _forward(graphdef, jax.lax.stop_gradient(p), rows)
        tok = logprobs.token_logps(hidden, unembed, labels, mask_BxT=mask, **kw)
        out[name] = jax.lax.stop_gradient(logprobs.sequence_logps(tok, mask)[0])
    return out


# ---------------------------------------------------------------------------
# Loss of one micro-batch
# ---------------------------------------------------------------------------

def _weighted_sums(spec: StepSpec, out: types.LossOutput, weight: Array) -> tuple[Array, Array, dict[str, Array]]:
    keep = weight if out.keep is None else weight * out.keep
    live = keep > 0
    # where, not a product: a filler example's NaN loss must not reach the sum.
    loss_sum = jnp.sum(jnp.where(live, keep * out.losses, 0.0))
    metric_sums = {}
    for name, value in out.metrics.items():
        value = jnp.broadcast_to(jnp.asarray(value, jnp.float32), keep.shape)
        metric_sums[name] = jnp.sum(jnp.where(live, keep * value, 0.0))
    return loss_sum, jnp.sum(keep), metric_sums


def micro_loss(spec: StepSpec, cfg: ModelConfig, graphdef: nnx.GraphDef, trainable: dict[str, Any],
               loss_state: Any, frozen: Any, ref_params: Any, mb: Batch) -> tuple[Array, tuple]:
    """(weighted loss sum, (weight sum, metric sums, new loss state, token count))."""
    params = policy_params(spec, trainable, frozen)
    r = responses(spec, cfg, graphdef, params, ref_params, mb, trainable.get("reward_head"))
    inputs = loss_inputs.build(spec.loss.inputs, r, mb, spec.columns)
    spec.loss.check_inputs(inputs)  # at trace time: a missing field is a named error, not a crash
    if spec.loss.stateful:
        out = spec.loss.fn(inputs, loss_state, **spec.hparams)
        new_loss_state = out.state
    else:
        out = spec.loss.fn(inputs, **spec.hparams)
        new_loss_state = loss_state
    loss_sum, count, metric_sums = _weighted_sums(spec, out, mb["weight"])
    tokens = jnp.sum(mb["segments"] > 0).astype(jnp.float32)
    return loss_sum, (count, metric_sums, new_loss_state, tokens)


def split_microbatches(batch: Batch, spec: StepSpec) -> Batch:
    """Adds a leading micro-batch axis A = spec.grad_accum (unpacked batches only).

    Rows k * B + b become, in micro-batch a, rows k * (B / A) + b' with
    b = a * (B / A) + b', so every micro-batch keeps the unpacked layout.
    """
    a, k = spec.grad_accum, spec.num_responses
    out = {}
    for key, value in batch.items():
        if key in PER_EXAMPLE_KEYS:
            out[key] = value.reshape((a, value.shape[0] // a) + value.shape[1:])
        else:
            r, t = value.shape
            out[key] = value.reshape(k, a, r // (k * a), t).transpose(1, 0, 2, 3).reshape(a, r // a, t)
    return out


# ---------------------------------------------------------------------------
# The train step
# ---------------------------------------------------------------------------

def _tree_where(cond: Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


def train_step(spec: StepSpec, cfg: ModelConfig, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, state: TrainState, frozen: Any, batch: Batch,
               ) -> tuple[TrainState, dict[str, Array]]:
    ref_params = reference_params(spec, state, frozen)
    grad_fn = jax.value_and_grad(functools.partial(micro_loss, spec, cfg, graphdef), has_aux=True)

    def one(loss_state, mb):
        (loss_sum, (count, metric_sums, new_loss_state, tokens)), grads = grad_fn(
            state.params, loss_state, frozen, ref_params, mb)
        return new_loss_state, (grads, loss_sum, count, metric_sums, tokens)

    if spec.grad_accum == 1:
        loss_state, (grads, loss_sum, count, metric_sums, tokens) = one(state.loss_state, batch)
    else:
        def body(carry, mb):
            loss_state, acc = carry
            loss_state, out = one(loss_state, mb)
            return (loss_state, jax.tree.map(jnp.add, acc, out)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: one(state.loss_state, _first(batch, spec))[1]))
        (loss_state, (grads, loss_sum, count, metric_sums, tokens)), _ = jax.lax.scan(
            body, (state.loss_state, zeros), split_microbatches(batch, spec))

    denom = jnp.maximum(count, 1e-9)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite gradient would poison the optimizer moments: zero it, then keep the old state.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, opt_state = tx.update(safe_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(
        step=state.step + 1,
        params=_tree_where(finite, params, state.params),
        opt_state=_tree_where(finite, opt_state, state.opt_state),
        loss_state=_tree_where(finite, loss_state, state.loss_state),
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        ref_params=state.ref_params,
    )
    if spec.ref_update != "none":
        new_state.ref_params = _updated_reference(spec, new_state, frozen)
    metrics = {f"loss/{k}" if "/" not in k else k: v / denom for k, v in metric_sums.items()}
    metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
                   examples=count, tokens=tokens, nonfinite=(~finite).astype(jnp.float32))
    return new_state, metrics


def _first(batch: Batch, spec: StepSpec) -> Batch:
    return jax.tree.map(lambda x: x[0], split_microbatches(batch, spec))


def _updated_reference(spec: StepSpec, state: TrainState, frozen: Any) -> Any:
    """TR-DPO: every N steps, mix the policy into the reference (soft) or copy it (hard)."""
    policy = jax.lax.stop_gradient(policy_params(spec, state.params, frozen))
    due = (state.step % spec.ref_update_every) == 0
    if spec.ref_update == "soft":
        target = jax.tree.map(lambda p, r: (spec.ref_alpha * p.astype(jnp.float32)
                                            + (1.0 - spec.ref_alpha) * r.astype(jnp.float32)).astype(r.dtype),
                              policy, state.ref_params)
    else:
        target = jax.tree.map(lambda p, r: p.astype(r.dtype), policy, state.ref_params)
    return _tree_where(due, target, state.ref_params)


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

def eval_step(spec: StepSpec, cfg: ModelConfig, graphdef: nnx.GraphDef, state: TrainState, frozen: Any,
              batch: Batch) -> dict[str, Array]:
    """Weighted sums over one held-out batch: loss, the loss's metrics, weight (no update).

    The loop divides by the summed weight after the last batch, so a partial
    final batch counts exactly.
    """
    ref_params = reference_params(spec, state, frozen)
    loss_sum, (count, metric_sums, _, tokens) = micro_loss(
        spec, cfg, graphdef, state.params, state.loss_state, frozen, ref_params, batch)
    return dict(metric_sums, loss=loss_sum, examples=count, tokens=tokens)


# ---------------------------------------------------------------------------
# jit with explicit shardings
# ---------------------------------------------------------------------------

def jit_train_step(spec: StepSpec, cfg: ModelConfig, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, state_shardings: Any, frozen_shardings: Any, batch_shardings: Any,
                   metrics_sharding: jax.sharding.Sharding):
    """train_step as one jitted program: explicit in/out shardings, the state donated."""
    fn = functools.partial(train_step, spec, cfg, graphdef, tx, schedule)
    return jax.jit(fn, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, metrics_sharding), donate_argnums=(0,))


def jit_eval_step(spec: StepSpec, cfg: ModelConfig, graphdef: nnx.GraphDef, state_shardings: Any,
                  frozen_shardings: Any, batch_shardings: Any, metrics_sharding: jax.sharding.Sharding):
    fn = functools.partial(eval_step, spec, cfg, graphdef)
    return jax.jit(fn, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=metrics_sharding)
