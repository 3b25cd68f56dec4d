"""The train step: every loss runs through it, the reference gets no gradient, sharded equals
single-device, gradient accumulation equals one big batch, packed equals unpacked, the NaN guard,
TR-DPO reference updates and LoRA's base-as-reference."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prefjax import models, roles, sharding
from prefjax.losses import registry, types
from prefjax.models import lora as lora_lib
from prefjax.train import loss_inputs, optim, steps
from prefjax.train.state import TrainState
from tests.batch_helpers import CFG, pack_pairs
from tests.batch_helpers import random_batch as _batch
from tests.batch_helpers import tiny_model as _model
from tests.batch_helpers import tiny_scorer as _scorer

KIND_OF = {types.PairLogps: ("pair", 2), types.RewardPair: ("pair", 2), types.UnpairedLogps: ("unpaired", 1),
           types.ListLogps: ("ranked", 3), types.RatedResponses: ("ranked", 3)}
TX = optax.adam(1e-2)


def _schedule(step):
    return 1e-2


def _state(spec, params):
    trainable = {"model": params}
    if spec.policy.reward_head:
        trainable["reward_head"] = jnp.zeros((CFG.hidden_size, 1), jnp.float32)
    loss = spec.loss
    loss_state = loss.init_state(**spec.hparams) if loss.stateful else {}
    ref = jax.tree.map(jnp.copy, params) if spec.reference.moves else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=TX.init(trainable),
                      loss_state=loss_state, nonfinite_steps=jnp.zeros((), jnp.int32), ref_params=ref)


def _step(spec):
    step = jax.jit(functools.partial(steps.train_step, spec, _scorer(), TX, _schedule))
    return lambda state, reference, batch: step(state, roles.Fixed(reference=reference), batch)


def _spec(name, reference=None, **kw):
    loss = registry.get(name)
    kind, k = KIND_OF[loss.inputs]
    reference = reference or roles.Reference("frozen" if loss.needs_reference else "none")
    hparams = tuple(sorted(loss.hparam_defaults.items()))
    return steps.StepSpec(loss_name=name, loss_hparams=hparams, reference=reference,
                          policy=roles.Policy(reward_head=loss.inputs in (types.RewardPair, types.RatedResponses)),
                          columns=loss_inputs.Columns(scores=True, margin=True, sampler_logps=True, origin=True),
                          **kw), (kind, k)


def _online_batch(loss, kind, k, seed):
    """An online loss's batch: sampler log-probs and origins, and (HyPO) a third response, its policy sample."""
    k = 3 if "sample" in loss.requires else k
    batch = _batch(kind, k, seed=seed)
    rng = np.random.default_rng(seed)
    return batch.replace(sampler_logps=jnp.asarray(rng.uniform(-30.0, -5.0, (batch.num_examples, k)), jnp.float32),
                         origin=jnp.asarray(rng.integers(0, 2, (batch.num_examples, k)), jnp.float32))


# The model is the same whatever the loss: CI's second pass on the accelerator's code path
# (PREFJAX_ATTENTION=xla, .ci/run) runs a pairwise, an unpaired and a token-level loss.
ACCELERATOR_PATH_LOSSES = ("dpo", "kto", "tdpo2")


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_loss_runs_through_the_step(name):
    if os.environ.get("PREFJAX_ATTENTION") and name not in ACCELERATOR_PATH_LOSSES:
        pytest.skip(f"the accelerator-path pass runs {ACCELERATOR_PATH_LOSSES} only")
    spec, (kind, k) = _spec(name)
    _, params = _model()
    frozen = jax.tree.map(jnp.copy, params) if spec.reference.kind == "frozen" else None
    frozen_before = jax.device_get(frozen)
    state = _state(spec, params)
    before = jax.device_get(state.params)
    step = _step(spec)
    batches = [_online_batch(spec.loss, kind, k, seed) for seed in (0, 1)]
    state, m1 = step(state, frozen, batches[0])
    state, m2 = step(state, frozen, batches[1])
    for m in (m1, m2):
        assert np.isfinite(float(m["loss"])) and float(m["nonfinite"]) == 0.0, name
        # beta-DPO keeps a fraction rho of the batch, SFT the desirable half (labels alternate);
        # every other loss counts all 4 examples.
        assert float(m["examples"]) == {"beta_dpo": 3.0, "sft": 2.0}.get(name, 4.0)
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(state.params))]
    assert any(moved), f"{name}: no parameter changed"
    if frozen is not None:  # the reference is read, never written
        for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
            np.testing.assert_array_equal(a, np.asarray(b))
    assert int(state.step) == 2


def test_reference_gets_no_gradient():
    spec, (kind, k) = _spec("dpo")
    _, params = _model()
    frozen = jax.tree.map(lambda x: x * 1.01, params)
    batch = _batch(kind, k)

    def loss(policy, ref):
        return steps.micro_loss(spec, _scorer(), {"model": policy}, {}, roles.Fixed(reference=ref), ref, batch)[0]

    ref_grads, policy_grads = jax.jit(jax.grad(loss, argnums=(1, 0)))(params, frozen)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(ref_grads))
    # ...while the policy does get one, and the loss does depend on the reference's values.
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(policy_grads))
    a, b = jax.jit(lambda: (loss(params, frozen), loss(params, params)))()
    assert abs(float(a) - float(b)) > 1e-6


@pytest.mark.parametrize("mesh_shape", [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 4, "tensor": 2},
                                        {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_step_equals_single_device(mesh_shape):
    spec, (kind, k) = _spec("dpo")
    _, params = _model()
    batches = [_batch(kind, k, b=8, seed=s) for s in range(2)]
    step = _step(spec)
    state = _state(spec, params)
    want = []
    for batch in batches:
        state, m = step(state, params, batch)
        want.append(float(m["loss"]))
    want_params = jax.device_get(state.params)

    mesh = sharding.make_mesh(mesh_shape)
    with sharding.use_mesh(mesh):
        param_sh = models.param_shardings(CFG, mesh)
        placed = jax.device_put(params, param_sh)
        # The state is donated: it must not share buffers with the reference.
        state = _state(spec, jax.tree.map(jnp.copy, placed))
        repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state_sh = TrainState(step=repl, params={"model": param_sh},
                              opt_state=optim.opt_state_shardings(TX, {"model": params}, {"model": param_sh}, mesh),
                              loss_state={}, nonfinite_steps=repl)
        state = jax.device_put(state, state_sh)
        batch_sh = batches[0].shardings(mesh)
        fixed_sh = roles.Fixed(reference=param_sh)
        jitted = steps.jit_train_step(spec, _scorer(), TX, _schedule, state_sh, fixed_sh, batch_sh, repl)
        got = []
        for batch in batches:
            state, m = jitted(state, roles.Fixed(reference=placed), jax.device_put(batch, batch_sh))
            got.append(float(m["loss"]))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(want_params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(b), a, atol=2e-6)


def test_gradient_accumulation_equals_one_batch():
    spec, (kind, k) = _spec("dpo")
    _, params = _model()
    batch = _batch(kind, k, b=8)
    full, m_full = _step(spec)(_state(spec, params), params, batch)
    spec2 = dataclasses.replace(spec, grad_accum=4)
    accum, m_acc = _step(spec2)(_state(spec2, params), params, batch)
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_full["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_microbatch_split_keeps_the_unpacked_layout():
    _, (kind, _) = _spec("lipo")
    batch = _batch(kind, 3, b=4)
    micro = batch.microbatches(2)
    # micro-batch a, row k * 2 + b' = response k of example a * 2 + b'
    for a in range(2):
        for k in range(3):
            for bb in range(2):
                np.testing.assert_array_equal(micro.tokens[a][k * 2 + bb], batch.tokens[k * 4 + a * 2 + bb])
        np.testing.assert_array_equal(micro.scores[a], batch.scores[a * 2:(a + 1) * 2])


def test_packed_rows_give_the_same_loss_as_unpacked():
    spec, (kind, k) = _spec("dpo")
    _, params = _model()
    batch = _batch(kind, k, b=4)
    packed = pack_pairs(batch)
    fixed = roles.Fixed(reference=params)

    @jax.jit
    def both():
        a = steps.responses(spec, _scorer(), params, params, batch)
        b = steps.responses(spec, _scorer(), params, params, packed)
        la = steps.micro_loss(spec, _scorer(), {"model": params}, {}, fixed, params, batch)[0]
        lb = steps.micro_loss(spec, _scorer(), {"model": params}, {}, fixed, params, packed)[0]
        return (a.logps, a.lengths, la), (b.logps, b.lengths, lb)

    (a_logps, a_len, la), (b_logps, b_len, lb) = both()
    np.testing.assert_allclose(np.asarray(b_logps), np.asarray(a_logps), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(b_len), np.asarray(a_len))
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)


def test_nonfinite_loss_leaves_the_state_unchanged():
    spec, (kind, k) = _spec("dpo")
    _, params = _model()
    batch = _batch(kind, k)
    batch = batch.replace(weight=batch.weight.at[0].set(jnp.inf))
    state = _state(spec, params)
    before = jax.device_get(state.params)
    state, m = _step(spec)(state, params, batch)
    assert float(m["nonfinite"]) == 1.0 and int(state.nonfinite_steps) == 1 and int(state.step) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.opt_state) if x.dtype != jnp.int32)


def _run_one_step(tx, damage=None):
    """One DPO step of the tiny model under optimizer `tx`, the opt state first passed through `damage`:
    (state before as numpy, state after, metrics)."""
    spec, (kind, k) = _spec("dpo")
    _, params = _model()
    state = _state(spec, params)
    state.opt_state = tx.init(state.params)
    if damage is not None:
        state.opt_state = damage(state.opt_state)
    before = jax.device_get(state)
    step = jax.jit(functools.partial(steps.train_step, spec, _scorer(), tx, _schedule))
    after, metrics = step(state, roles.Fixed(reference=params), _batch(kind, k))
    return before, after, metrics


def _assert_kept(before, after):
    for name in ("params", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))):
            np.testing.assert_array_equal(a, np.asarray(b))  # NaNs at the same places count as equal


def test_a_finite_gradient_whose_update_overflows_is_not_applied():
    # Adam's unit-size step times 4e38, beyond float32's largest value (3.4e38): the loss and the
    # gradient are finite, the updated weights are not.
    tx = optax.chain(optax.scale_by_adam(), optax.scale(-1e38), optax.scale(4.0))
    before, after, m = _run_one_step(tx)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert float(m["nonfinite"]) == 1.0 and float(m["nonfinite_update"]) == 1.0
    assert int(after.nonfinite_steps) == 1 and int(after.step) == 1
    _assert_kept(before, after)


def test_a_damaged_optimizer_state_does_not_reach_the_weights():
    # A NaN in Adam's first moment (as flipped bytes in a checkpoint leave it): the gradient is finite,
    # but every update would carry the NaN into the weights.
    def damage(opt_state):
        leaves, treedef = jax.tree.flatten(opt_state)
        first_float = next(i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating))
        leaves[first_float] = leaves[first_float].at[(0,) * leaves[first_float].ndim].set(jnp.nan)
        return jax.tree.unflatten(treedef, leaves)

    before, after, m = _run_one_step(TX, damage)
    assert np.isfinite(float(m["grad_norm"]))
    assert float(m["nonfinite"]) == 1.0 and float(m["nonfinite_update"]) == 1.0
    assert int(after.nonfinite_steps) == 1
    _assert_kept(before, after)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(after.params))


def test_a_normal_step_still_applies_its_update():
    before, after, m = _run_one_step(TX)
    assert float(m["nonfinite"]) == 0.0 and float(m["nonfinite_update"]) == 0.0
    assert int(after.nonfinite_steps) == 0 and int(after.step) == 1
    changed = [not np.array_equal(a, np.asarray(b))
               for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params))]
    assert all(changed)


@pytest.mark.parametrize("update, alpha", [("soft", 0.25), ("hard", 1.0)])
def test_tr_dpo_reference_updates(update, alpha):
    spec, (kind, k) = _spec("dpo", reference=roles.Reference("frozen", refresh=update, refresh_every=2, alpha=alpha))
    _, params = _model()
    state = _state(spec, params)
    step = _step(spec)
    ref0 = jax.device_get(state.ref_params)
    state, _ = step(state, None, _batch(kind, k, seed=0))  # step 1: not due
    for a, b in zip(jax.tree.leaves(ref0), jax.tree.leaves(state.ref_params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    state, _ = step(state, None, _batch(kind, k, seed=1))  # step 2: due
    policy = jax.device_get(state.params["model"])
    for p, r0, r in zip(jax.tree.leaves(policy), jax.tree.leaves(ref0), jax.tree.leaves(state.ref_params)):
        np.testing.assert_allclose(np.asarray(r), alpha * p + (1 - alpha) * r0, atol=1e-6)


def test_lora_reference_is_the_base_with_adapters_off():
    lcfg = lora_lib.LoraConfig(rank=2, alpha=4.0)
    spec, (kind, k) = _spec("dpo", reference=roles.Reference("lora"))
    spec = dataclasses.replace(spec, policy=roles.Policy(lora=lcfg))
    _, params = _model()
    adapters = lora_lib.init_lora(params, lcfg, jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params={"adapters": adapters},
                       opt_state=TX.init({"adapters": adapters}), loss_state={},
                       nonfinite_steps=jnp.zeros((), jnp.int32))
    base_before = jax.device_get(params)
    step = jax.jit(functools.partial(steps.train_step, spec, _scorer(), TX, _schedule))
    fixed = roles.Fixed(base=params)  # the reference reads the base: no second copy
    state, m = step(state, fixed, _batch(kind, k, seed=0))
    # Fresh adapters are a no-op: policy == reference, so DPO's first loss is log 2.
    np.testing.assert_allclose(float(m["loss"]), np.log(2.0), rtol=1e-6)
    state, m = step(state, fixed, _batch(kind, k, seed=0))
    assert float(m["loss"]) < np.log(2.0)
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))


