"""Roles (prefjax.roles): what "auto" resolves to for each loss, which weights each reference kind
reads in the step, TR-DPO refreshes, and that a reference-free loss holds no reference copy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import roles, sharding
from prefjax.losses import registry
from prefjax.models import lora as lora_lib
from prefjax.train import config_lib, setup


@pytest.mark.parametrize("loss_name", registry.names())
def test_auto_gives_a_loss_exactly_the_reference_it_reads(loss_name):
    loss = registry.get(loss_name)
    kind = roles.resolve_kind("auto", loss, lora=False)
    reads = any(f.startswith("ref_") for f in loss.requires + loss.uses)
    assert kind == ("frozen" if reads else "none")
    assert roles.resolve_kind("auto", loss, lora=True) == ("lora" if reads else "none")
    if loss.needs_reference:
        assert kind != "none"
    assert roles.resolve_kind("precomputed", loss, lora=False) == "precomputed"


def test_each_kind_reads_its_own_weights():
    copy, base, moving = {"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, {"w": jnp.full(2, 5.0)}
    fixed = roles.Fixed(base=base, reference=copy)
    assert roles.Reference("frozen").params(None, fixed) is copy
    assert roles.Reference("lora").params(None, fixed) is base
    assert roles.Reference("precomputed").params(None, fixed) is None
    assert roles.Reference("none").params(None, fixed) is None
    assert roles.Reference("frozen", refresh="hard").params(moving, fixed) is moving
    assert roles.Reference("lora").runs_in_step and not roles.Reference("precomputed").runs_in_step
    with pytest.raises(ValueError, match="resolve 'auto'"):
        roles.Reference("auto")


def test_frozen_copy_is_new_buffers_cast_to_the_reference_dtype():
    params = {"w": jnp.arange(4.0)}
    ref, _ = roles.Reference("frozen", dtype="bfloat16").fixed(params, None)
    assert ref["w"].dtype == jnp.bfloat16 and ref["w"] is not params["w"]
    np.testing.assert_array_equal(np.asarray(ref["w"], np.float32), np.arange(4.0))
    assert roles.Reference("frozen", refresh="soft").fixed(params, None) == (None, None)  # it moves instead
    moving = roles.Reference("frozen", refresh="soft").initial_moving(params)
    assert moving["w"] is not params["w"]


@pytest.mark.parametrize("mode, alpha, want", [("soft", 0.25, 0.25 * 4.0 + 0.75 * 1.0), ("hard", 1.0, 4.0)])
def test_refresh_is_due_every_n_steps(mode, alpha, want):
    ref = roles.Reference("frozen", refresh=mode, refresh_every=2, alpha=alpha)
    policy, current = {"w": jnp.full(3, 4.0)}, {"w": jnp.ones(3)}
    np.testing.assert_array_equal(ref.refreshed(jnp.int32(3), policy, current)["w"], 1.0)  # not due
    np.testing.assert_allclose(ref.refreshed(jnp.int32(4), policy, current)["w"], want)


def test_lora_policy_applies_adapters_to_the_base():
    base = {"layers": {"0": {"attn": {"q": jnp.ones((4, 2, 2))}}}}
    lcfg = lora_lib.LoraConfig(rank=1, alpha=1.0, targets=("attn/q$",))
    adapters = jax.tree.map(lambda x: x + 1.0, lora_lib.init_lora(base, lcfg, jax.random.key(0)))
    policy = roles.Policy(lora=lcfg)
    got = policy.params({"adapters": adapters}, roles.Fixed(base=base))
    want = lora_lib.apply_lora(base, adapters, lcfg)
    np.testing.assert_array_equal(got["layers"]["0"]["attn"]["q"], want["layers"]["0"]["attn"]["q"])
    assert roles.Policy().params({"model": base}, roles.Fixed()) is base


@pytest.mark.parametrize("loss_name, want_copy", [("simpo", False), ("bradley_terry", False), ("sft", False),
                                                  ("dpo", True)])
def test_a_reference_free_loss_holds_no_reference_copy(loss_name, want_copy):
    config = config_lib.trainer_config()
    config.loss_name = loss_name
    config_lib.validate(config)
    mesh = sharding.make_mesh({"data": -1})
    with sharding.use_mesh(mesh):
        built = setup.build(config, mesh, None, columns=setup.loss_inputs.Columns())
    assert (built.fixed.reference is not None) == want_copy
    assert built.spec.reference.kind == ("frozen" if want_copy else "none")
    assert built.fixed.base is None and built.state.ref_params is None


def test_a_fresh_reward_head_is_drawn_from_n_0_1_over_d_plus_1():
    mesh = sharding.make_mesh({"data": -1})
    hidden, labels = 4095, 3
    policy = roles.Policy(reward_head=True, reward_labels=labels)
    trainable, shardings = policy.init_trainable({}, {}, key=jax.random.key(0), mesh=mesh, axes=None, rules=None,
                                                 hidden_size=hidden)
    head = np.asarray(trainable["reward_head"], np.float64)
    assert head.shape == (hidden, labels) and trainable["reward_head"].dtype == jnp.float32
    assert shardings["reward_head"].spec == jax.sharding.PartitionSpec()  # replicated
    # 12285 draws: the sample std is within 3% of (D + 1) ** -0.5 = 1/64, the mean within 4 standard errors of 0
    assert abs(head.std() * 64.0 - 1.0) < 0.03 and abs(head.mean()) < 4 / 64 / np.sqrt(head.size)
    given = np.ones((hidden, labels), np.float32)  # an imported model's head is kept as it is
    kept, _ = policy.init_trainable({}, {}, key=jax.random.key(0), mesh=mesh, axes=None, rules=None,
                                    hidden_size=hidden, reward_head=given)
    np.testing.assert_array_equal(np.asarray(kept["reward_head"]), given)
