"""The step-memory arithmetic, recounted by hand from a config's shapes."""

from __future__ import annotations

import os

import pytest

from prefjax import models
from prefjax.models import memory_budget


def _hand_count(d, f, n, k, h, layers):
    block = (2 * d) + (n * h + 2 * k * h) + (n * h) + n + (2 * d) + (3 * f)
    return layers * block + 2 * d


def test_activation_count_follows_the_shapes():
    cfg = models.get_preset("llama2-tiny", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16)
    assert memory_budget.activation_floats_per_token(cfg) == _hand_count(64, 128, 4, 2, 16, 2) == 1800


def test_parts_scale_with_dtype_slots_and_tokens():
    cfg = models.get_preset("llama2-tiny")
    n, per_token = cfg.num_params, memory_budget.activation_floats_per_token(cfg)
    m = memory_budget.preference_step_memory(cfg, tokens=1000)
    assert (m.params, m.grads, m.optimizer, m.reference) == (4 * n, 4 * n, 8 * n, 4 * n)
    assert m.activations == 1000 * per_token * 4
    assert m.total == 20 * n + 4000 * per_token
    sgd = memory_budget.preference_step_memory(cfg, tokens=1000, optimizer_slots=0, reference=False)
    assert sgd.optimizer == 0 and sgd.reference == 0 and sgd.total == 8 * n + 4000 * per_token
    half_ref = memory_budget.preference_step_memory(cfg, tokens=10, reference_dtype="bfloat16")
    assert half_ref.reference == 2 * n
    bf16 = memory_budget.preference_step_memory(cfg.replace(param_dtype="bfloat16", dtype="bfloat16"), tokens=10)
    assert bf16.params == 2 * n and bf16.activations == 10 * per_token * 2
    assert "activations" in m.describe() and f"{m.total / 2**20:,.1f} MiB" in m.describe()


def test_unknown_dtype_is_an_error():
    with pytest.raises(KeyError):
        memory_budget.preference_step_memory(models.get_preset("llama2-tiny"), 1, reference_dtype="int4")


@pytest.mark.skipif(bool(os.environ.get("PREFJAX_ATTENTION")),
                    reason="a property of the CPU attention paths: jax's XLA attention on CPU keeps T x T probabilities")
def test_a_shallow_models_compiled_dpo_step_stays_within_1_3x_of_the_arithmetic():
    # The benchmark's memory target, checked on the compiled program (no run): a 2-layer model
    # is where fixed per-step buffers weigh most (one MLP backward's temporaries, the log-prob
    # tiles, zero-filled gradient buffers that XLA would fill at the program's start).
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    from prefjax import roles, scoring
    from prefjax.data import synthetic_batches
    from prefjax.train import loss_inputs, steps
    from prefjax.train.state import TrainState

    cfg = models.get_preset("llama2-tiny", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, vocab_size=1024, max_position_embeddings=1024)
    graphdef, params = models.init_params(cfg, seed=0)
    tx = optax.adamw(1e-4, weight_decay=0.0)
    spec = steps.StepSpec(loss_name="dpo", loss_hparams=(("beta", 0.1),), reference=roles.Reference("frozen"),
                          columns=loss_inputs.Columns())
    trainable = {"model": params}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                       loss_state={}, nonfinite_steps=jnp.zeros((), jnp.int32))
    rows, length = 16, 512
    batch = synthetic_batches.random_batch(8, 2, length, 1024, fill=1.0).map(jnp.asarray)
    step = jax.jit(functools.partial(steps.train_step, spec, scoring.Model(cfg, graphdef), tx, lambda s: 1e-4),
                   donate_argnums=(0,))
    m = step.lower(state, roles.Fixed(reference=params), batch).compile().memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    required = memory_budget.preference_step_memory(cfg, rows * length).total
    assert peak <= 1.3 * required, (peak / 2**20, required / 2**20)
