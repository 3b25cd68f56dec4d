"""Properties every registered loss must have, checked over the whole registry.

Inputs come from each loss's declared needs (tests/losses/synthetic.py), so a
newly registered loss is covered here without editing this file: it must run
under jit/vmap/grad, compute in float32 from bfloat16 inputs, stay finite at
extreme log-probs, reject missing fields by name, and move in the right
direction when the preferred response becomes more likely.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import losses
from prefjax.data import synthetic_logps as synthetic
from prefjax.losses import types

ALL = losses.names()

# Pairwise losses that, by design, do not decrease monotonically as the chosen
# log-prob rises: each pulls the margin or log-ratio to a finite target, past
# which raising the chosen log-prob raises the loss.
NON_MONOTONE_PAIRWISE = {
    "ipo": "regresses h onto 1/(2 beta)",
    "sppo_hard": "regresses rho_w onto 1/(2 beta)",
    "exo": "matches sigma(beta h) to 1 - eps, not to 1",
    "nca": "its -1/2 log sigma(-r_w) term pushes rho_w down once r_w is large",
    "apo_down": "pushes the chosen likelihood down (its sigma(beta rho_w) term)",
    "sppo": "regresses rho_w onto eta (P_w - 1/2)",
    "inpo": "regresses its margin h_t onto eta/2",
    "xpo": "its exploration term lowers a chosen response that the reference sampled",
}

# Unpaired losses whose feedback is a win probability (`score`), not the label: the sign of
# d loss / d logps follows p - 1/2 at the reference (checked in the label test below).
SCORED_NOT_LABELLED = {"nash_md": "score-function surrogate on P(y > y')"}


def _call(spec, inputs, state=None, **hparams):
    if spec.stateful:
        state = synthetic.initial_state(spec) if state is None else state
        return spec(inputs, state, **hparams)
    return spec(inputs, **hparams)


def _policy_fields(inputs):
    names = synthetic.POLICY_FIELDS[type(inputs)]
    return {n: getattr(inputs, n) for n in names if getattr(inputs, n) is not None}


def _loss_of_policy(spec, inputs):
    """sum of per-example losses as a function of the policy-side fields."""

    def fn(policy):
        out = _call(spec, dataclasses.replace(inputs, **policy))
        keep = 1.0 if out.keep is None else out.keep
        return jnp.sum(out.losses * keep)

    return fn


@pytest.mark.parametrize("name", ALL)
def test_jit_matches_eager_and_outputs_are_well_formed(name):
    spec = losses.get(name)
    inputs = synthetic.make_inputs(spec, batch=6, seed=1)
    eager = _call(spec, inputs)
    jitted = jax.jit(lambda x: _call(spec, x))(inputs)
    assert eager.losses.shape == (6,) and eager.losses.dtype == jnp.float32
    np.testing.assert_allclose(jitted.losses, eager.losses, rtol=1e-5, atol=1e-6)
    assert eager.metrics, f"{name} reports no metrics"
    for key, value in eager.metrics.items():
        assert jnp.shape(value) == (6,), f"{name}: metric {key!r} has shape {jnp.shape(value)}"
        assert bool(jnp.all(jnp.isfinite(value))), f"{name}: metric {key!r} is not finite"
    if eager.keep is not None:
        assert eager.keep.shape == (6,)


@pytest.mark.parametrize("name", [n for n in ALL if losses.get(n).stateful])
def test_stateful_losses_carry_state_through_a_jitted_scan(name):
    spec = losses.get(name)
    inputs = synthetic.make_inputs(spec, batch=8, seed=2)
    state0 = synthetic.initial_state(spec)

    def step(state, _):
        out = spec(inputs, state)
        return out.state, out.losses

    final_state, per_step = jax.jit(lambda s: jax.lax.scan(step, s, None, length=3))(state0)
    assert jax.tree.structure(final_state) == jax.tree.structure(state0)
    assert per_step.shape == (3, 8) and bool(jnp.all(jnp.isfinite(per_step)))
    # Eager steps give the same trajectory.
    state = state0
    for t in range(3):
        out = spec(inputs, state)
        state = out.state
        np.testing.assert_allclose(per_step[t], out.losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_vmap_over_an_outer_batch_axis(name):
    spec = losses.get(name)
    parts = [synthetic.make_inputs(spec, batch=4, seed=s) for s in (3, 4)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
    state = synthetic.initial_state(spec)
    vmapped = jax.vmap(lambda x: _call(spec, x, state).losses)(stacked)
    for i, part in enumerate(parts):
        np.testing.assert_allclose(vmapped[i], _call(spec, part, state).losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_gradients_are_finite(name):
    spec = losses.get(name)
    inputs = synthetic.make_inputs(spec, batch=5, seed=5)
    grads = jax.grad(_loss_of_policy(spec, inputs))(_policy_fields(inputs))
    for field, g in grads.items():
        assert bool(jnp.all(jnp.isfinite(g))), f"{name}: gradient w.r.t. {field} is not finite"


def _extreme_inputs(spec, seed: int):
    """Inputs whose log-probs are -1e4 or ~0 and whose margins reach +-1e4."""
    rng = np.random.default_rng(seed)
    inputs = synthetic.make_inputs(spec, batch=16, seed=seed)
    extremes = np.array([-1e4, -1e-3, -5e3])
    replaced = {}
    for field in dataclasses.fields(inputs):
        name, value = field.name, getattr(inputs, field.name)
        if value is None or value.dtype == jnp.bool_:
            continue
        shape = value.shape
        if name in ("chosen", "rejected", "ref_chosen", "ref_rejected", "gold", "logps", "ref_logps",
                    "kl_logps", "ref_kl_logps", "prev_chosen", "prev_rejected", "sample", "ref_sample") \
                or name.endswith("_token_logps"):
            if spec.inputs is types.RewardPair:  # rewards, not log-probs
                replaced[name] = rng.choice([-1e4, 0.0, 1e4], shape)
            else:
                replaced[name] = rng.choice(extremes, shape)
        elif name.endswith("_token_kl"):
            replaced[name] = rng.choice([0.0, 1e3], shape)
        elif name.endswith("_len") or name in ("length", "lengths"):
            replaced[name] = rng.choice([1.0, 1000.0], shape)
        elif name == "predicted":
            replaced[name] = rng.choice([-1e4, 1e4], shape)
    return dataclasses.replace(inputs, **{k: jnp.asarray(v, jnp.float32) for k, v in replaced.items()})


@pytest.mark.parametrize("name", ALL)
def test_finite_at_extreme_logprobs_and_margins(name):
    spec = losses.get(name)
    for seed in range(3):
        inputs = _extreme_inputs(spec, seed)
        out = _call(spec, inputs)
        assert bool(jnp.all(jnp.isfinite(out.losses))), f"{name}: loss not finite: {out.losses}"
        grads = jax.grad(_loss_of_policy(spec, inputs))(_policy_fields(inputs))
        for field, g in grads.items():
            assert bool(jnp.all(jnp.isfinite(g))), f"{name}: gradient w.r.t. {field} not finite at extremes"


@pytest.mark.parametrize("name", ALL)
def test_bfloat16_inputs_compute_in_float32(name):
    spec = losses.get(name)
    low = synthetic.make_inputs(spec, batch=7, seed=6, dtype=jnp.bfloat16)
    # The same values, exactly representable, promoted to float32.
    high = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, low)
    out_low, out_high = _call(spec, low), _call(spec, high)
    assert out_low.losses.dtype == jnp.float32
    np.testing.assert_allclose(out_low.losses, out_high.losses, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_each_missing_required_field_is_named(name):
    spec = losses.get(name)
    inputs = synthetic.make_inputs(spec, batch=3)
    for field in spec.requires:
        broken = dataclasses.replace(inputs, **{field: None})
        with pytest.raises(losses.LossInputError, match=f"loss '{name}' needs field '{field}'"):
            _call(spec, broken)


@pytest.mark.parametrize("name", [n for n in ALL if losses.get(n).inputs is types.PairLogps])
def test_raising_the_chosen_logprob_never_raises_a_monotone_pairwise_loss(name):
    spec = losses.get(name)
    grad_fn = jax.grad(lambda c, x: _loss_of_policy(spec, x)({"chosen": c}))
    if name in NON_MONOTONE_PAIRWISE:
        # Witnesses that the non-monotonicity is real (and documented above).
        inputs = synthetic.make_inputs(spec, batch=2, seed=7)
        witnesses = [
            dataclasses.replace(inputs, chosen=inputs.ref_chosen + 200.0, rejected=inputs.ref_rejected),
            dataclasses.replace(inputs, chosen=inputs.ref_chosen, rejected=inputs.ref_rejected + 50.0),
            # past SPPO's target eta (P_w - 1/2) at its default eta = 1000
            dataclasses.replace(inputs, chosen=inputs.ref_chosen + 5000.0, rejected=inputs.ref_rejected),
        ]
        assert any(bool(jnp.any(grad_fn(w.chosen, w) > 0)) for w in witnesses), name
        return
    for seed in range(4):
        inputs = synthetic.make_inputs(spec, batch=32, seed=seed)
        if seed >= 2:
            inputs = _extreme_inputs(spec, seed)
        g = grad_fn(inputs.chosen, inputs)
        assert bool(jnp.all(g <= 1e-6)), f"{name}: d loss / d chosen > 0: {g}"


@pytest.mark.parametrize("name", [n for n in ALL if losses.get(n).inputs is types.UnpairedLogps])
def test_unpaired_losses_reward_desirable_and_penalise_undesirable(name):
    spec = losses.get(name)
    inputs = synthetic.make_inputs(spec, batch=16, seed=8)
    if name in SCORED_NOT_LABELLED:
        # At the reference (rho = 0) only the win probability moves the sample: up iff p > 1/2.
        inputs = dataclasses.replace(inputs, logps=inputs.ref_logps)
        g = jax.grad(lambda l: _loss_of_policy(spec, inputs)({"logps": l}))(inputs.logps)
        np.testing.assert_array_equal(np.sign(g), -np.sign(np.asarray(inputs.score) - 0.5))
        return
    g = jax.grad(lambda l: _loss_of_policy(spec, inputs)({"logps": l}))(inputs.logps)
    label = np.asarray(inputs.label).astype(bool)
    assert bool(jnp.all(g[label] <= 1e-6)), f"{name}: desirable gradient > 0"
    assert bool(jnp.all(g[~label] >= -1e-6)), f"{name}: undesirable gradient < 0"


@pytest.mark.parametrize("name", [n for n in ALL if losses.get(n).inputs is types.ListLogps])
def test_raising_the_best_responses_logprob_never_raises_a_listwise_loss(name):
    spec = losses.get(name)
    inputs = synthetic.make_inputs(spec, batch=16, seed=9)
    g = jax.grad(lambda l: _loss_of_policy(spec, inputs)({"logps": l}))(inputs.logps)
    best = np.argmax(np.asarray(inputs.scores), axis=1)
    assert bool(jnp.all(g[np.arange(16), best] <= 1e-6)), f"{name}: {g}"


@pytest.mark.parametrize("name", [n for n in ALL if losses.get(n).inputs is types.RewardPair])
def test_reward_model_losses_prefer_a_higher_chosen_reward(name):
    spec = losses.get(name)
    inputs = synthetic.make_inputs(spec, batch=16, seed=10)
    g = jax.grad(lambda c: _loss_of_policy(spec, inputs)({"chosen": c}))(inputs.chosen)
    assert bool(jnp.all(g <= 1e-6))
