"""The train step: every loss runs through it, the reference gets no gradient, sharded equals
single-device, gradient accumulation equals one big batch, packed equals unpacked, the NaN guard,
TR-DPO reference updates and LoRA's base-as-reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prefjax import loss_inputs, models, optim, response_logps, sharding, steps, synthetic_batches
from prefjax.losses import registry, types
from prefjax.models import lora as lora_lib
from prefjax.state import TrainState

CFG = models.get_preset("llama2-tiny", num_layers=1, hidden_size=32, intermediate_size=64, vocab_size=64,
                        num_heads=2, num_kv_heads=1)
KIND_OF = {types.PairLogps: ("pair", 2), types.RewardPair: ("pair", 2), types.UnpairedLogps: ("unpaired", 1),
           types.ListLogps: ("ranked", 3), types.RatedResponses: ("ranked", 3)}
TX = optax.adam(1e-2)


def _schedule(step):
    return 1e-2


@functools.lru_cache(maxsize=None)
def _model(seed: int = 0):
    return models.init_params(CFG, seed=seed)


def _batch(kind, k, b=4, t=16, seed=0):
    return {key: jnp.asarray(v) for key, v in
            synthetic_batches.random_batch(b, k, t, CFG.vocab_size, seed=seed, kind=kind).items()}


def _state(spec, params, reward=False):
    trainable = {"model": params}
    if reward:
        trainable["reward_head"] = jnp.zeros((CFG.hidden_size,), jnp.float32)
    loss = spec.loss
    loss_state = loss.init_state(**spec.hparams) if loss.stateful else {}
    ref = jax.tree.map(jnp.copy, params) if spec.ref_update != "none" else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=TX.init(trainable),
                      loss_state=loss_state, nonfinite_steps=jnp.zeros((), jnp.int32), ref_params=ref)


def _step(spec):
    return jax.jit(functools.partial(steps.train_step, spec, CFG, _model()[0], TX, _schedule))


def _spec(name, **kw):
    kind, k = KIND_OF[registry.get(name).inputs]
    reference = "frozen" if registry.get(name).needs_reference else "none"
    hparams = tuple(sorted(registry.get(name).hparam_defaults.items()))
    return steps.StepSpec(loss_name=name, loss_hparams=hparams, num_responses=k, reference=reference,
                          columns=loss_inputs.Columns(scores=True, margin=True), **kw), kind


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_loss_runs_through_the_step(name):
    spec, kind = _spec(name)
    _, params = _model()
    frozen = jax.tree.map(jnp.copy, params) if spec.reference == "frozen" else None
    frozen_before = jax.device_get(frozen)
    state = _state(spec, params, reward=spec.reward_model)
    before = jax.device_get(state.params)
    step = _step(spec)
    state, m1 = step(state, frozen, _batch(kind, spec.num_responses, seed=0))
    state, m2 = step(state, frozen, _batch(kind, spec.num_responses, seed=1))
    for m in (m1, m2):
        assert np.isfinite(float(m["loss"])) and float(m["nonfinite"]) == 0.0, name
        # beta-DPO keeps a fraction rho of the batch; every other loss counts all 4 examples.
        assert float(m["examples"]) == (3.0 if name == "beta_dpo" else 4.0)
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(state.params))]
    assert any(moved), f"{name}: no parameter changed"
    if frozen is not None:  # the reference is read, never written
        for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
            np.testing.assert_array_equal(a, np.asarray(b))
    assert int(state.step) == 2


def test_reference_gets_no_gradient():
    spec, kind = _spec("dpo")
    graphdef, params = _model()
    frozen = jax.tree.map(lambda x: x * 1.01, params)
    batch = _batch(kind, 2)

    def loss(policy, ref):
        return steps.micro_loss(spec, CFG, graphdef, {"model": policy}, {}, ref, ref, batch)[0]

    ref_grads, policy_grads = jax.jit(jax.grad(loss, argnums=(1, 0)))(params, frozen)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(ref_grads))
    # ...while the policy does get one, and the loss does depend on the reference's values.
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(policy_grads))
    a, b = jax.jit(lambda: (loss(params, frozen), loss(params, params)))()
    assert abs(float(a) - float(b)) > 1e-6


@pytest.mark.parametrize("mesh_shape", [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 4, "tensor": 2},
                                        {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_step_equals_single_device(mesh_shape):
    spec, kind = _spec("dpo")
    graphdef, params = _model()
    batches = [_batch(kind, 2, b=8, seed=s) for s in range(2)]
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
        batch_sh = {k: sharding.named_sharding(mesh, ("batch",) + (None,) * (v.ndim - 1), v.shape)
                    for k, v in batches[0].items()}
        jitted = steps.jit_train_step(spec, CFG, graphdef, TX, _schedule, state_sh, param_sh, batch_sh, repl)
        got = []
        for batch in batches:
            state, m = jitted(state, placed, jax.device_put(batch, batch_sh))
            got.append(float(m["loss"]))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(want_params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(b), a, atol=2e-6)


def test_gradient_accumulation_equals_one_batch():
    spec, kind = _spec("dpo")
    _, params = _model()
    batch = _batch(kind, 2, b=8)
    full, m_full = _step(spec)(_state(spec, params), params, batch)
    spec2 = steps.StepSpec(**{**spec.__dict__, "grad_accum": 4})
    accum, m_acc = _step(spec2)(_state(spec2, params), params, batch)
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_full["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_microbatch_split_keeps_the_unpacked_layout():
    spec, kind = _spec("lipo")
    spec = steps.StepSpec(**{**spec.__dict__, "grad_accum": 2})
    batch = _batch(kind, 3, b=4)
    micro = steps.split_microbatches(batch, spec)
    # micro-batch a, row k * 2 + b' = response k of example a * 2 + b'
    for a in range(2):
        for k in range(3):
            for bb in range(2):
                np.testing.assert_array_equal(micro["tokens"][a][k * 2 + bb], batch["tokens"][k * 4 + a * 2 + bb])
        np.testing.assert_array_equal(micro["scores"][a], batch["scores"][a * 2:(a + 1) * 2])


def _pack(batch, k):
    """Two consecutive unpacked rows per packed row, as segments 1 and 2."""
    tokens = np.asarray(batch["tokens"])
    r, t = tokens.shape
    b = r // k
    live = np.asarray(batch["segments"]) > 0
    rows = {key: [] for key in ("tokens", "positions", "segments", "loss_mask", "example_id", "response_id")}
    for start in range(0, r, 2):
        out = {key: np.zeros(2 * t, np.float32 if key == "loss_mask" else np.int32) for key in rows}
        out["example_id"][:] = -1
        out["response_id"][:] = -1
        offset = 0
        for seg, row in enumerate((start, start + 1), start=1):
            n = int(live[row].sum())
            sl = slice(offset, offset + n)
            out["tokens"][sl] = tokens[row][:n]
            out["positions"][sl] = np.arange(n)
            out["segments"][sl] = seg
            out["loss_mask"][sl] = np.asarray(batch["loss_mask"])[row][:n]
            out["example_id"][sl] = row % b
            out["response_id"][sl] = row // b
            offset += n
        for key in rows:
            rows[key].append(out[key])
    packed = {key: jnp.asarray(np.stack(v)) for key, v in rows.items()}
    packed.update({key: batch[key] for key in ("weight", "scores", "margin", "label")})
    return packed


def test_packed_rows_give_the_same_loss_as_unpacked():
    spec, kind = _spec("dpo")
    graphdef, params = _model()
    batch = _batch(kind, 2, b=4)
    packed = _pack(batch, 2)
    packed_spec = steps.StepSpec(**{**spec.__dict__, "packed": True})
    @jax.jit
    def both():
        a = steps.responses(spec, CFG, graphdef, params, params, batch)
        b = steps.responses(packed_spec, CFG, graphdef, params, params, packed)
        la = steps.micro_loss(spec, CFG, graphdef, {"model": params}, {}, params, params, batch)[0]
        lb = steps.micro_loss(packed_spec, CFG, graphdef, {"model": params}, {}, params, params, packed)[0]
        return (a.logps, a.lengths, la), (b.logps, b.lengths, lb)

    (a_logps, a_len, la), (b_logps, b_len, lb) = both()
    np.testing.assert_allclose(np.asarray(b_logps), np.asarray(a_logps), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(b_len), np.asarray(a_len))
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)


def test_per_response_sums_match_a_direct_computation():
    spec, kind = _spec("dpo")
    graphdef, params = _model()
    batch = _batch(kind, 2, b=3)
    got = jax.jit(lambda: steps.responses(spec, CFG, graphdef, params, None, batch))()
    hidden, _ = models.apply(graphdef, params, batch["tokens"], positions_BxT=batch["positions"],
                             segments_BxT=batch["segments"])
    logits = np.asarray(hidden @ models.unembedding(graphdef, params), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["loss_mask"])
    for row in range(6):
        want = sum(logp[row, t - 1, tokens[row, t]] for t in range(1, tokens.shape[1]) if mask[row, t] > 0)
        k, b = divmod(row, 3)
        np.testing.assert_allclose(float(got.logps[b, k]), want, rtol=1e-5)
        assert float(got.lengths[b, k]) == mask[row].sum()


def test_nonfinite_loss_leaves_the_state_unchanged():
    spec, kind = _spec("dpo")
    _, params = _model()
    batch = _batch(kind, 2)
    batch["weight"] = batch["weight"].at[0].set(jnp.inf)
    state = _state(spec, params)
    before = jax.device_get(state.params)
    state, m = _step(spec)(state, params, batch)
    assert float(m["nonfinite"]) == 1.0 and int(state.nonfinite_steps) == 1 and int(state.step) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.opt_state) if x.dtype != jnp.int32)


@pytest.mark.parametrize("update, alpha", [("soft", 0.25), ("hard", 1.0)])
def test_tr_dpo_reference_updates(update, alpha):
    spec, kind = _spec("dpo", ref_update=update, ref_update_every=2, ref_alpha=alpha)
    _, params = _model()
    state = _state(spec, params)
    step = _step(spec)
    ref0 = jax.device_get(state.ref_params)
    state, _ = step(state, None, _batch(kind, 2, seed=0))  # step 1: not due
    for a, b in zip(jax.tree.leaves(ref0), jax.tree.leaves(state.ref_params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    state, _ = step(state, None, _batch(kind, 2, seed=1))  # step 2: due
    policy = jax.device_get(state.params["model"])
    for p, r0, r in zip(jax.tree.leaves(policy), jax.tree.leaves(ref0), jax.tree.leaves(state.ref_params)):
        np.testing.assert_allclose(np.asarray(r), alpha * p + (1 - alpha) * r0, atol=1e-6)


def test_lora_reference_is_the_base_with_adapters_off():
    lcfg = lora_lib.LoraConfig(rank=2, alpha=4.0)
    spec, kind = _spec("dpo")
    spec = steps.StepSpec(**{**spec.__dict__, "reference": "lora", "lora": lcfg})
    graphdef, params = _model()
    adapters = lora_lib.init_lora(params, lcfg, jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params={"adapters": adapters},
                       opt_state=TX.init({"adapters": adapters}), loss_state={},
                       nonfinite_steps=jnp.zeros((), jnp.int32))
    base_before = jax.device_get(params)
    step = _step(spec)
    state, m = step(state, params, _batch(kind, 2, seed=0))
    # Fresh adapters are a no-op: policy == reference, so DPO's first loss is log 2.
    np.testing.assert_allclose(float(m["loss"]), np.log(2.0), rtol=1e-6)
    state, m = step(state, params, _batch(kind, 2, seed=0))
    assert float(m["loss"]) < np.log(2.0)
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_mismatched_rows_pair_each_prompt_with_the_next_response():
    batch = _batch("unpaired", 1, b=3, t=20)
    rows = {k: np.asarray(v) for k, v in jax.jit(response_logps.mismatched_rows)(batch).items()}
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["loss_mask"]) > 0
    for b in range(3):
        nxt = (b + 1) % 3
        prompt = tokens[b][:np.argmax(mask[b])]
        response = tokens[nxt][mask[nxt]]
        want = np.concatenate([prompt, response])[:20]
        n = len(want)
        np.testing.assert_array_equal(rows["tokens"][b][:n], want)
        np.testing.assert_array_equal(rows["loss_mask"][b][:n] > 0, np.arange(n) >= len(prompt))
        assert rows["segments"][b][:n].all() and not rows["segments"][b][n:].any()
