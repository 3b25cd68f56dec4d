"""The pure train and eval steps, and the one helper that jits them with shardings.

One train step is one XLA program: every response row of the batch (chosen
and rejected, or K ranked, or single unpaired responses) goes through the
policy in one forward (prefjax.scoring.score); the reference's forward runs in
the same program under stop_gradient (or its log-probs come with the batch);
the loss comes from the registry; gradient accumulation is a scan over
micro-batches inside the program; the optimizer update, the loss's carried
state, TR-DPO reference refreshes and the NaN guard happen before the program
returns. Metrics come back as device scalars (the loop fetches them one step
late).

A step whose loss or gradient norm is not finite, or whose updated params,
optimizer state or loss state are not (a finite gradient can still overflow
Adam's second moment or, with a huge learning rate, a weight; a state already
damaged stays damaged), leaves params, optimizer state and loss state unchanged
and counts itself in `nonfinite_steps`; the loop then stops the run or carries
on, as the config says. The metric `nonfinite` marks every such step,
`nonfinite_update` those whose gradient was finite but whose update was not.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from prefjax import roles, scoring
from prefjax.batch import Batch
from prefjax.losses import registry, types
from prefjax.train import loss_inputs
from prefjax.train.state import TrainState

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the step besides the model and the batch's layout (a hashable
    jit argument): the loss and its hyperparameters, the roles, accumulation, data columns."""

    loss_name: str
    loss_hparams: tuple[tuple[str, Any], ...]
    reference: roles.Reference = roles.Reference()
    policy: roles.Policy = roles.Policy()
    grad_accum: int = 1
    columns: loss_inputs.Columns = loss_inputs.Columns()

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
    def mismatched_pairs(self) -> bool:
        return "kl_logps" in self.loss.requires


# ---------------------------------------------------------------------------
# What the loss reads, for one micro-batch
# ---------------------------------------------------------------------------

def responses(spec: StepSpec, model: scoring.Model, params: Any, ref_params: Any, mb: Batch,
              reward_head: Optional[Array] = None) -> scoring.Scores:
    """The policy's scores of one micro-batch, with the reference's log-probs (and KTO's
    mismatched pairs) where the loss reads them."""
    # a reward model reads only its head: no log-probs, so no unembedding in the step
    what = ["rewards"] if spec.policy.reward_head else ["logps"]
    if spec.token_level:
        what.append("token_kl")
    scores = scoring.score(model, params, mb, what=what, reference=ref_params if spec.token_level else None,
                           reward_head=reward_head)
    if scores.ref_logps is None:
        if ref_params is not None:
            reference = scoring.score(model, jax.lax.stop_gradient(ref_params), mb)
            scores = scores.replace(ref_logps=jax.lax.stop_gradient(reference.logps))
        elif spec.reference.kind == "precomputed":
            scores = scores.replace(ref_logps=mb.ref_logps)
    if spec.mismatched_pairs:
        # KTO's KL baseline: each prompt with another row's response, under both models, no gradient.
        rows = scoring.mismatched(mb)
        out = {}
        for name, p in (("kl_logps", params), ("ref_kl_logps", ref_params)):
            out[name] = jax.lax.stop_gradient(scoring.score(model, jax.lax.stop_gradient(p), rows).logps[:, 0])
        scores = scores.replace(**out)
    return scores


# ---------------------------------------------------------------------------
# Loss of one micro-batch
# ---------------------------------------------------------------------------

def _weighted_sums(out: types.LossOutput, weight: Array) -> tuple[Array, Array, dict[str, Array]]:
    keep = weight if out.keep is None else weight * out.keep
    live = keep > 0
    # where, not a product: a filler example's NaN loss must not reach the sum.
    loss_sum = jnp.sum(jnp.where(live, keep * out.losses, 0.0))
    metric_sums = {}
    for name, value in out.metrics.items():
        value = jnp.broadcast_to(jnp.asarray(value, jnp.float32), keep.shape)
        metric_sums[name] = jnp.sum(jnp.where(live, keep * value, 0.0))
    return loss_sum, jnp.sum(keep), metric_sums


def micro_loss(spec: StepSpec, model: scoring.Model, trainable: dict[str, Any], loss_state: Any,
               fixed: roles.Fixed, ref_params: Any, mb: Batch) -> tuple[Array, tuple]:
    """(weighted loss sum, (weight sum, metric sums, new loss state, token count))."""
    params = spec.policy.params(trainable, fixed)
    r = responses(spec, model, params, ref_params, mb, trainable.get("reward_head"))
    inputs = loss_inputs.build(spec.loss.inputs, r, mb, spec.columns)
    spec.loss.check_inputs(inputs)  # at trace time: a missing field is a named error, not a crash
    spec.loss.check_hparam_values(spec.hparams)  # as config_lib does: a direct caller gets the same error
    if spec.loss.stateful:
        out = spec.loss.fn(inputs, loss_state, **spec.hparams)
        new_loss_state = out.state
    else:
        out = spec.loss.fn(inputs, **spec.hparams)
        new_loss_state = loss_state
    loss_sum, count, metric_sums = _weighted_sums(out, mb.weight)
    tokens = jnp.sum(mb.segments > 0).astype(jnp.float32)
    return loss_sum, (count, metric_sums, new_loss_state, tokens)


# ---------------------------------------------------------------------------
# The train step
# ---------------------------------------------------------------------------

def _tree_where(cond: Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


def _all_finite(tree: Any) -> Array:
    """True when every floating-point leaf of `tree` is finite (integer leaves, like optax's step
    count or a PRNG key, always are). One reduction per leaf, which XLA fuses with the computation
    of the leaf; nothing is copied."""
    flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return functools.reduce(jnp.logical_and, flags, jnp.asarray(True))


def train_step(spec: StepSpec, model: scoring.Model, tx: optax.GradientTransformation, schedule: optax.Schedule,
               state: TrainState, fixed: roles.Fixed, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
    ref_params = spec.reference.params(state.ref_params, fixed)
    grad_fn = jax.value_and_grad(functools.partial(micro_loss, spec, model), has_aux=True)

    def one(loss_state, mb):
        (loss_sum, (count, metric_sums, new_loss_state, tokens)), grads = grad_fn(
            state.params, loss_state, fixed, ref_params, mb)
        return new_loss_state, (grads, loss_sum, count, metric_sums, tokens)

    if spec.grad_accum == 1:
        loss_state, (grads, loss_sum, count, metric_sums, tokens) = one(state.loss_state, batch)
    else:
        def body(carry, mb):
            loss_state, acc = carry
            loss_state, out = one(loss_state, mb)
            return (loss_state, jax.tree.map(jnp.add, acc, out)), None

        micro = batch.microbatches(spec.grad_accum)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: one(state.loss_state, micro.microbatch(0))[1]))
        (loss_state, (grads, loss_sum, count, metric_sums, tokens)), _ = jax.lax.scan(
            body, (state.loss_state, zeros), micro)

    denom = jnp.maximum(count, 1e-9)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    grads_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite gradient would poison the optimizer moments: zero it, then keep the old state.
    safe_grads = jax.tree.map(lambda g: jnp.where(grads_finite, g, 0.0), grads)
    updates, opt_state = tx.update(safe_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite gradient can still give a non-finite update (Adam's second moment overflowing, a huge
    # learning rate, a state damaged before this step): such an update is not applied either.
    update_finite = _all_finite((params, opt_state, loss_state))
    finite = grads_finite & update_finite
    new_state = TrainState(
        step=state.step + 1,
        params=_tree_where(finite, params, state.params),
        opt_state=_tree_where(finite, opt_state, state.opt_state),
        loss_state=_tree_where(finite, loss_state, state.loss_state),
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        ref_params=state.ref_params,
    )
    if spec.reference.moves:
        new_state.ref_params = spec.reference.refreshed(
            new_state.step, spec.policy.params(new_state.params, fixed), state.ref_params)
    metrics = {f"loss/{k}" if "/" not in k else k: v / denom for k, v in metric_sums.items()}
    metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
                   examples=count, tokens=tokens, nonfinite=(~finite).astype(jnp.float32),
                   nonfinite_update=(grads_finite & ~update_finite).astype(jnp.float32))
    return new_state, metrics


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

def eval_step(spec: StepSpec, model: scoring.Model, state: TrainState, fixed: roles.Fixed,
              batch: Batch) -> dict[str, Array]:
    """Weighted sums over one held-out batch: loss, the loss's metrics, weight (no update).

    The loop divides by the summed weight after the last batch, so a partial
    final batch counts exactly.
    """
    ref_params = spec.reference.params(state.ref_params, fixed)
    loss_sum, (count, metric_sums, _, tokens) = micro_loss(
        spec, model, state.params, state.loss_state, fixed, ref_params, batch)
    return dict(metric_sums, loss=loss_sum, examples=count, tokens=tokens)


# ---------------------------------------------------------------------------
# jit with explicit shardings
# ---------------------------------------------------------------------------

def jit_train_step(spec: StepSpec, model: scoring.Model, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, state_shardings: Any, fixed_shardings: Any, batch_shardings: Any,
                   metrics_sharding: jax.sharding.Sharding):
    """train_step as one jitted program: explicit in/out shardings, the state donated."""
    fn = functools.partial(train_step, spec, model, tx, schedule)
    return jax.jit(fn, in_shardings=(state_shardings, fixed_shardings, batch_shardings),
                   out_shardings=(state_shardings, metrics_sharding), donate_argnums=(0,))


def jit_eval_step(spec: StepSpec, model: scoring.Model, state_shardings: Any, fixed_shardings: Any,
                  batch_shardings: Any, metrics_sharding: jax.sharding.Sharding):
    fn = functools.partial(eval_step, spec, model)
    return jax.jit(fn, in_shardings=(state_shardings, fixed_shardings, batch_shardings),
                   out_shardings=metrics_sharding)
