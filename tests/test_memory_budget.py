"""The step-memory arithmetic, recounted by hand from a config's shapes."""

from __future__ import annotations

import pytest

from prefjax import memory_budget, models


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
