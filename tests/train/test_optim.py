"""prefjax.train.optim: schedules against hand formulas, the weight-decay mask per path,
clipping, every optimizer on a tiny model, and optimizer-state shardings on 8 fake
CPU devices."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.tree_util import keystr

from prefjax import models, sharding
from prefjax.train import optim


def _config(**fields):
    c = optim.default_config()
    for key, value in fields.items():
        setattr(c, key, value)
    return c


# --------------------------------------------------------------------------- schedules

def _hand_lr(step, *, kind, peak, warmup, total, ratio):
    """The documented schedule, written out independently of the implementation."""
    end = peak * ratio
    if step < warmup:
        return peak * step / warmup
    t = min((step - warmup) / (total - warmup), 1.0)
    if kind == "constant":
        return peak
    if kind == "linear":
        return peak - (peak - end) * t
    return end + (peak - end) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("kind", optim.SCHEDULES)
def test_schedule_matches_hand_formula(kind):
    peak, warmup, total, ratio = 2e-3, 10, 100, 0.1
    _, schedule = optim.make_optimizer(
        _config(schedule=kind, learning_rate=peak, warmup_steps=warmup, min_learning_rate_ratio=ratio), total)
    for step in (0, 1, 5, 9, 10, 11, 33, 55, 99, 100, 150):
        want = _hand_lr(step, kind=kind, peak=peak, warmup=warmup, total=total, ratio=ratio)
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), (kind, step)


def test_schedule_landmarks():
    peak = 1.0
    _, cosine = optim.make_optimizer(_config(schedule="cosine", learning_rate=peak, warmup_steps=10,
                                             min_learning_rate_ratio=0.2), 110)
    assert float(cosine(0)) == 0.0
    assert float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(60)) == pytest.approx(0.6)  # halfway down the cosine: (1 + 0.2) / 2
    assert float(cosine(110)) == pytest.approx(0.2)


def test_warmup_fraction_of_total_steps():
    assert optim.resolve_warmup_steps(0.1, 1000) == 100
    assert optim.resolve_warmup_steps(0.25, 40) == 10
    assert optim.resolve_warmup_steps(7, 40) == 7
    assert optim.resolve_warmup_steps(7.0, 40) == 7  # ConfigDict turns ints into floats
    assert optim.resolve_warmup_steps(0, 40) == 0
    _, schedule = optim.make_optimizer(_config(schedule="constant", learning_rate=4.0, warmup_steps=0.25), 40)
    assert float(schedule(5)) == pytest.approx(2.0)  # 5 / 10 of the way up
    assert float(schedule(10)) == pytest.approx(4.0)


@pytest.mark.parametrize("bad", [1.5, -1, 41, "10", True])
def test_bad_warmup_names_the_field(bad):
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.resolve_warmup_steps(bad, 40)


def test_no_warmup_starts_at_peak():
    _, schedule = optim.make_optimizer(_config(schedule="linear", learning_rate=3.0, warmup_steps=0), 10)
    assert float(schedule(0)) == pytest.approx(3.0)
    assert float(schedule(5)) == pytest.approx(1.5)


def test_optimizer_applies_the_schedule_step_by_step():
    # Plain SGD on all-ones gradients: each update is exactly -lr(step).
    peak, warmup, total = 0.5, 4, 12
    tx, _ = optim.make_optimizer(_config(name="sgd", momentum=0.0, grad_clip_norm=0.0, learning_rate=peak,
                                         warmup_steps=warmup, schedule="linear"), total)
    params = {"w": jnp.zeros((3,))}
    state = tx.init(params)
    for step in range(total + 2):
        updates, state = tx.update({"w": jnp.ones((3,))}, state, params)
        want = _hand_lr(step, kind="linear", peak=peak, warmup=warmup, total=total, ratio=0.0)
        np.testing.assert_allclose(np.asarray(updates["w"]), -want, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- config errors

def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(ValueError) as err:
        optim.make_optimizer(_config(name="adagrad"), 10)
    for name in optim.OPTIMIZERS:
        assert name in str(err.value)


def test_unknown_field_and_bad_values_are_named():
    with pytest.raises(ValueError, match="lerning_rate"):
        optim.make_optimizer({"lerning_rate": 1e-3}, 10)
    with pytest.raises(ValueError, match="'b2'"):
        optim.make_optimizer({"b2": 1.0}, 10)
    with pytest.raises(ValueError, match="weight_decay"):
        optim.make_optimizer({"name": "adam", "weight_decay": 0.1}, 10)
    with pytest.raises(ValueError, match="schedule"):
        optim.make_optimizer({"schedule": "exp"}, 10)
    with pytest.raises(ValueError, match="weight_decay_mask"):
        optim.make_optimizer({"weight_decay_mask": "kernels"}, 10)


def test_partial_mapping_takes_defaults():
    _, schedule = optim.make_optimizer({"learning_rate": 1e-3, "warmup_steps": 0, "schedule": "constant"}, 10)
    assert float(schedule(3)) == pytest.approx(1e-3)


# --------------------------------------------------------------------------- weight decay

@pytest.fixture(scope="module")
def tiny_model():
    """One-layer qwen2-tiny params (random, from the abstract shapes without compiling) and a jitted loss.

    One layer has every kind of parameter (kernels, biases, norms, embedding, lm_head)
    at half the compile time of two.
    """
    cfg = models.get_preset("qwen2-tiny", num_layers=1)
    graphdef, shapes, _ = models.abstract(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)))

    def loss(p):
        hidden, _ = models.apply(graphdef, p, tokens)
        logits = hidden @ models.unembedding(graphdef, p)
        # Pull every position towards token 0.
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].take(0, axis=-1))

    return params, jax.jit(jax.value_and_grad(loss))


# The matmul kernels, by name: the documented set that "no_norms_or_biases" decays.
_KERNELS = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}


@pytest.mark.parametrize("preset", ["qwen2-tiny", "qwen3-tiny", "gemma2-tiny"])
def test_default_mask_decays_exactly_the_kernels(preset):
    _, shapes, _ = models.abstract(models.get_preset(preset))
    mask = optim.weight_decay_mask("no_norms_or_biases")(shapes)
    for path, decayed in jax.tree_util.tree_flatten_with_path(mask)[0]:
        last = path[-1].key
        assert decayed == (last in _KERNELS), keystr(path)
    flat = {keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["['embedding']"] is False
    if preset == "qwen2-tiny":
        assert flat["['layers'][0]['attn']['q_bias']"] is False  # 2-D, still a bias
    if preset == "qwen3-tiny":
        assert flat["['layers'][0]['attn']['q_norm']['scale']"] is False
    if preset == "gemma2-tiny":
        assert flat["['layers'][1]['post_mlp_norm']['scale']"] is False


def test_all_and_none_masks():
    _, shapes, _ = models.abstract(models.get_preset("qwen2-tiny"))
    assert all(jax.tree.leaves(optim.weight_decay_mask("all")(shapes)))
    assert not any(jax.tree.leaves(optim.weight_decay_mask("none")(shapes)))


@pytest.mark.parametrize("mask_kind", optim.WEIGHT_DECAY_MASKS)
def test_decay_acts_only_where_masked(mask_kind, tiny_model):
    # Zero gradients: AdamW's moment term is 0, so the update is the decay alone.
    lr, wd = 0.1, 0.5
    params = tiny_model[0]
    tx, _ = optim.make_optimizer(_config(learning_rate=lr, weight_decay=wd, weight_decay_mask=mask_kind,
                                         warmup_steps=0, schedule="constant"), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    flat_updates = jax.tree_util.tree_flatten_with_path(updates)[0]
    for (path, update), param in zip(flat_updates, jax.tree.leaves(params)):
        decayed = {"all": True, "none": False}.get(mask_kind, path[-1].key in _KERNELS)
        want = -lr * wd * np.asarray(param) if decayed else np.zeros(param.shape)
        np.testing.assert_allclose(np.asarray(update), want, rtol=1e-5, atol=1e-8,
                                   err_msg=keystr(path))


# --------------------------------------------------------------------------- clipping

def test_clipping_bounds_the_update():
    clip = 0.5
    tx, _ = optim.make_optimizer(_config(name="sgd", momentum=0.0, learning_rate=1.0, warmup_steps=0,
                                         schedule="constant", grad_clip_norm=clip), 10)
    params = {"a": jnp.zeros((4,)), "b": {"c": jnp.zeros((2, 3))}}
    big = {"a": jnp.full((4,), 30.0), "b": {"c": jnp.full((2, 3), -40.0)}}
    norm = math.sqrt(4 * 30.0**2 + 6 * 40.0**2)
    updates, _ = jax.jit(tx.update)(big, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(clip, rel=1e-5)
    np.testing.assert_allclose(np.asarray(updates["a"]), -30.0 * clip / norm, rtol=1e-5)
    # Below the threshold the gradient passes unchanged.
    small = jax.tree.map(lambda g: g * 1e-3, big)
    updates, _ = jax.jit(tx.update)(small, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["b"]["c"]), 40.0e-3, rtol=1e-5)
    # Off: the raw gradient comes through.
    tx, _ = optim.make_optimizer(_config(name="sgd", momentum=0.0, learning_rate=1.0, warmup_steps=0,
                                         schedule="constant", grad_clip_norm=None), 10)
    updates, _ = jax.jit(tx.update)(big, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(norm, rel=1e-5)


# --------------------------------------------------------------------------- every optimizer

@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_steps_without_nan(name, tiny_model):
    params, value_and_grad = tiny_model
    tx, _ = optim.make_optimizer(_config(name=name, learning_rate=1e-2 if name != "lion" else 1e-3,
                                         weight_decay=0.0 if name == "adam" else 0.01,
                                         warmup_steps=0, schedule="constant"), 10)
    state = tx.init(params)

    @jax.jit
    def update(grads, s, p):
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    first, _ = value_and_grad(params)
    current = params
    for _ in range(4):
        _, grads = value_and_grad(current)
        current, state = update(grads, state, current)
    final, _ = value_and_grad(current)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves((current, state)))
    assert float(final) < float(first), (name, float(first), float(final))


# --------------------------------------------------------------------------- shardings

@pytest.fixture(scope="module")
def sharded_setup():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    # hidden_size 128 makes the embedding and MLP kernels large enough (>= 128 x 128) for
    # Adafactor to factor their second moments into row/column statistics.
    cfg = models.get_preset("qwen2-tiny", num_layers=1, hidden_size=128)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    param_shardings = models.param_shardings(cfg, mesh)
    _, abstract_params, _ = models.abstract(cfg)
    return cfg, mesh, param_shardings, abstract_params


# optax's names for param-shaped state: Adam's mu/nu, Lion's mu, SGD's trace, Adafactor's v.
_MOMENTS = ("mu", "nu", "trace", "v")


def _is_replicated(s, mesh):
    return s.mesh == mesh and all(axis is None for axis in s.spec)


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd", "adafactor"])
def test_state_shardings_follow_params(name, sharded_setup):
    _, mesh, param_shardings, abstract_params = sharded_setup
    tx, _ = optim.make_optimizer(_config(name=name, weight_decay=0.1), 10)
    shardings = optim.opt_state_shardings(tx, abstract_params, param_shardings, mesh)
    state = jax.eval_shape(tx.init, abstract_params)
    param_by_key = {keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
    shape_by_key = {keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    moments = 0
    for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(shardings)):
        key = keystr(path)
        # Moment trees sit under a named field (.mu, .nu, .trace, .v); the rest of the path is the param's.
        param_key = next((k for k in param_by_key if any(key.endswith(f".{field}{k}") for field in _MOMENTS)),
                         None)
        if param_key is not None and leaf.shape == shape_by_key[param_key]:
            moments += 1
            assert s == param_by_key[param_key], key
        else:
            assert _is_replicated(s, mesh), key
    counts = [s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
              if keystr(p).endswith(".count")]
    assert counts and all(_is_replicated(s, mesh) for s in counts)
    assert moments >= len(param_by_key) or name == "adafactor", "every parameter has a moment leaf"
    if name == "adafactor":
        factored = [keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
                    if ".v_row" in keystr(p) and x.shape != (1,)]
        assert factored, "some second moments are factored (and were checked to be replicated above)"
    # Some parameter shardings are really split, so the check above is not vacuous.
    assert any(any(axis is not None for axis in s.spec) for s in param_by_key.values())


def test_init_opt_state_places_leaves_as_announced(sharded_setup):
    _, mesh, param_shardings, abstract_params = sharded_setup
    rng = np.random.default_rng(0)
    host_params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract_params)
    params = jax.device_put(host_params, param_shardings)
    tx, _ = optim.make_optimizer(_config(weight_decay=0.1), 10)
    announced = optim.opt_state_shardings(tx, abstract_params, param_shardings, mesh)
    for given in (announced, param_shardings):  # both forms of `shardings` are accepted
        state = optim.init_opt_state(tx, params, given)
        for leaf, s in zip(jax.tree.leaves(state), jax.tree.leaves(announced)):
            assert leaf.sharding.is_equivalent_to(s, leaf.ndim), (leaf.shape, leaf.sharding, s)
            assert len(leaf.sharding.device_set) == 8  # nothing is left on one device
    mu = state[1].mu
    np.testing.assert_array_equal(np.asarray(mu["lm_head"]), 0.0)
    assert mu["lm_head"].sharding == param_shardings["lm_head"]
