"""LoRA adapters: no-op at init, adapter-only training, merge/unmerge, sharding, PEFT export."""

from __future__ import annotations

import functools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from prefjax import models, sharding
from prefjax.models import lora, safetensors_format, tree_paths

LCFG = lora.LoraConfig(rank=4, alpha=8.0)  # shared, so the jitted forwards compile once
TOKENS = (np.arange(2 * 12).reshape(2, 12) * 7 % 256).astype(np.int32)


def _forward(graphdef):
    """Jitted forward: effective params -> logits [B, T, V]."""

    @jax.jit
    def run(params, tokens):
        hidden, _ = models.apply(graphdef, params, tokens)
        return jnp.einsum("btd,dv->btv", hidden, models.unembedding(graphdef, params))

    return run


@functools.cache
def _setup(preset):
    """(cfg, graphdef, params), shared by the tests: arrays are immutable, and init compiles once."""
    cfg = models.get_preset(preset)
    graphdef, params = models.init_params(cfg, seed=0)
    return cfg, graphdef, params


@functools.cache
def _run(preset):
    """The preset's jitted forward, compiled once per test process."""
    return _forward(_setup(preset)[1])


@functools.cache
def _run_lora(preset):
    """The preset's jitted forward on apply_lora(params, adapters, lora_cfg): the training-time path."""
    run = _run(preset)
    return jax.jit(lambda p, ad, lcfg: run(lora.apply_lora(p, ad, lcfg), TOKENS), static_argnums=2)


def _randomise_b(adapters, seed=1, std=0.05):
    """Adapters with a nonzero B (as after training), A kept, each B keeping its sharding."""
    items = list(lora._adapter_items(adapters))
    keys = jax.random.split(jax.random.key(seed), len(items))
    flat = {}
    for key, (path, ad) in zip(keys, items):
        b = std * jax.random.normal(key, ad["b"].shape, ad["b"].dtype)
        flat[path] = {"a": ad["a"], "b": jax.device_put(b, ad["b"].sharding)}
    return tree_paths.nest(flat)


def _numpy_tree(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _flat(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------
# No-op at init, enabled=False, adapter-only training


@pytest.mark.parametrize("preset", ["llama3-tiny", "qwen2-tiny", "gemma2-tiny"])
def test_fresh_adapters_change_nothing(preset):
    _, graphdef, params = _setup(preset)
    lcfg = LCFG
    adapters = lora.init_lora(params, lcfg, jax.random.key(0))
    assert all(float(jnp.abs(ad["a"]).max()) > 0 for _, ad in lora._adapter_items(adapters))
    run = _run(preset)
    base = run(params, TOKENS)
    # apply_lora inside the jitted forward: W + scale * A @ 0 is W bit for bit.
    adapted = _run_lora(preset)(params, adapters, lcfg)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


def test_enabled_false_is_the_base_params_without_a_copy():
    _, graphdef, params = _setup("llama3-tiny")
    lcfg = LCFG
    adapters = _randomise_b(lora.init_lora(params, lcfg, jax.random.key(0)))
    assert lora.apply_lora(params, adapters, lcfg, enabled=False) is params
    run = _run("llama3-tiny")
    on = _run_lora("llama3-tiny")(params, adapters, lcfg)
    off = run(lora.apply_lora(params, adapters, lcfg, enabled=False), TOKENS)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(run(params, TOKENS)))
    assert float(jnp.abs(on - off).max()) > 1e-3


def test_optax_on_adapters_only_trains_them_and_leaves_the_base_bit_identical():
    _, graphdef, params = _setup("qwen2-tiny")
    base_copy = _numpy_tree(params)
    lcfg = LCFG
    adapters = lora.init_lora(params, lcfg, jax.random.key(0))
    tokens = jnp.asarray(TOKENS)

    def loss_fn(ad, p):
        hidden, _ = models.apply(graphdef, lora.apply_lora(p, ad, lcfg), tokens[:, :-1])
        logits = hidden @ models.unembedding(graphdef, p)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    opt = optax.adam(1e-2)
    state = opt.init(adapters)

    @jax.jit
    def step(ad, st, p):
        loss, g = jax.value_and_grad(loss_fn)(ad, p)
        updates, st = opt.update(g, st, ad)
        return optax.apply_updates(ad, updates), st, loss, g

    losses = []
    for i in range(4):
        adapters, state, loss, grads = step(adapters, state, params)
        losses.append(float(loss))
        if i == 0:
            # At B = 0 the gradient reaches B only: dL/dA = scale * dL/dW @ B^T = 0.
            for _, g in lora._adapter_items(grads):
                assert float(jnp.abs(g["a"]).max()) == 0.0
                assert float(jnp.abs(g["b"]).max()) > 0.0
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, _numpy_tree(params), base_copy)
    run = _run("qwen2-tiny")
    trained = _run_lora("qwen2-tiny")(params, adapters, lcfg)
    reference = run(lora.apply_lora(params, adapters, lcfg, enabled=False), TOKENS)
    np.testing.assert_array_equal(np.asarray(reference), np.asarray(run(base_copy, TOKENS)))
    assert float(jnp.abs(trained - reference).max()) > 1e-3


# ---------------------------------------------------------------------------
# The update itself, merge and unmerge


def test_delta_is_scaled_a_at_b_with_explicit_in_out_axes():
    cfg, _, params = _setup("llama3-tiny")
    for rslora, scale in ((False, 16.0 / 4), (True, 16.0 / 2)):
        lcfg = lora.LoraConfig(rank=4, alpha=16.0, rslora=rslora)
        assert lcfg.scale == scale
        adapters = _randomise_b(lora.init_lora(params, lcfg, jax.random.key(0)))
        merged = lora.merge(params, adapters, lcfg)
        d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
        # name -> (in size, out size): q, k, v read D; o reads (N, H); the MLP kernels read their first axis.
        sizes = {"q": (d, n * h), "k": (d, cfg.num_kv_heads * h), "o": (n * h, d)}
        for group, name in (("attn", "q"), ("attn", "k"), ("attn", "o")):
            fan_in, fan_out = sizes[name]
            ad = adapters["layers"][1][group][name]
            a = np.asarray(ad["a"], np.float64).reshape(fan_in, 4)
            b = np.asarray(ad["b"], np.float64).reshape(4, fan_out)
            w = np.asarray(params["layers"][1][group][name], np.float64).reshape(fan_in, fan_out)
            got = np.asarray(merged["layers"][1][group][name], np.float64).reshape(fan_in, fan_out)
            np.testing.assert_allclose(got, w + scale * a @ b, rtol=1e-5, atol=1e-6)
        assert adapters["layers"][0]["mlp"]["down"]["a"].shape == (f, 4)
        assert adapters["layers"][0]["mlp"]["down"]["b"].shape == (4, d)


def test_merge_unmerge_round_trip_and_untouched_leaves_are_shared():
    _, _, params = _setup("gemma2-tiny")
    lcfg = lora.LoraConfig(rank=8, alpha=16.0)
    adapters = _randomise_b(lora.init_lora(params, lcfg, jax.random.key(3)))
    merged = lora.merge(params, adapters, lcfg)
    back = lora.unmerge(merged, adapters, lcfg)
    assert merged["final_norm"]["scale"] is params["final_norm"]["scale"]
    assert merged["layers"][0]["attn_norm"]["scale"] is params["layers"][0]["attn_norm"]["scale"]
    assert float(jnp.abs(merged["layers"][0]["attn"]["o"] - params["layers"][0]["attn"]["o"]).max()) > 1e-3
    for key, leaf in _flat(params).items():
        np.testing.assert_allclose(np.asarray(_flat(back)[key]), np.asarray(leaf), rtol=0, atol=1e-6)
        assert _flat(back)[key].dtype == leaf.dtype


@pytest.mark.parametrize("preset", ["llama3-tiny", "gemma2-tiny"])
def test_merged_forward_equals_apply_lora_forward(preset):
    _, graphdef, params = _setup(preset)
    lcfg = LCFG
    adapters = _randomise_b(lora.init_lora(params, lcfg, jax.random.key(0)))
    run = _run(preset)
    merged = run(lora.merge(params, adapters, lcfg), TOKENS)
    applied = _run_lora(preset)(params, adapters, lcfg)
    np.testing.assert_allclose(np.asarray(applied), np.asarray(merged), rtol=1e-5, atol=1e-5)


def test_bfloat16_params_keep_their_dtype():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _setup("llama3-tiny")[2])
    lcfg = LCFG
    adapters = _randomise_b(lora.init_lora(params, lcfg, jax.random.key(0)))
    assert adapters["layers"][0]["attn"]["q"]["a"].dtype == jnp.float32
    merged = lora.apply_lora(params, adapters, lcfg)
    for key, leaf in _flat(params).items():
        assert _flat(merged)[key].dtype == leaf.dtype == jnp.bfloat16
    # The sum is taken in float32 and rounded once to the kernel's dtype.
    ad = adapters["layers"][0]["attn"]["q"]
    w = np.asarray(params["layers"][0]["attn"]["q"], np.float32)
    delta = lcfg.scale * np.tensordot(np.asarray(ad["a"]), np.asarray(ad["b"]), axes=1)
    want = (w + delta).astype(jnp.bfloat16).astype(np.float32)
    got = np.asarray(merged["layers"][0]["attn"]["q"], np.float32)
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6)
    assert (got != w).mean() > 0.5


# ---------------------------------------------------------------------------
# Target selection and initialisation


def test_partial_targets_select_only_those_kernels():
    _, _, params = _setup("qwen2-tiny")
    lcfg = lora.LoraConfig(targets=(r"layers/0/attn/(q|v)$", r"layers/1/mlp/down$"))
    adapters = lora.init_lora(params, lcfg, jax.random.key(0))
    assert sorted(lora.describe(adapters, lcfg)["paths"]) == [
        "layers/0/attn/q", "layers/0/attn/v", "layers/1/mlp/down"]


@pytest.mark.parametrize("targets, message", [
    ((r"layers/\d+/attn/qq$",), "matches no parameter"),
    ((r"attn_norm/scale$",), "norm scale"),
    ((r"layers/\d+/attn/q",), "is a bias"),   # no '$': also matches q_bias
    ((r"^embedding$",), "allow_embeddings"),
    ((r"^lm_head$",), "allow_embeddings"),
    ((r"final_norm",), "norm scale"),
])
def test_bad_targets_raise_clear_errors(targets, message):
    _, _, params = _setup("qwen2-tiny")
    with pytest.raises(ValueError, match=message):
        lora.init_lora(params, lora.LoraConfig(targets=targets), jax.random.key(0))


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="regular expression"):
        lora.LoraConfig(targets=("layers/(q",))
    with pytest.raises(ValueError, match="not one string"):
        lora.LoraConfig(targets=r"layers/\d+/attn/q$")
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="init"):
        lora.LoraConfig(init="orthogonal")


def test_adapters_that_do_not_fit_the_params_raise():
    _, _, params = _setup("llama3-tiny")
    lcfg = LCFG
    adapters = lora.init_lora(params, lcfg, jax.random.key(0))
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(params, adapters, lora.LoraConfig(rank=8))
    stray = {"layers": {7: {"attn": {"q": adapters["layers"][0]["attn"]["q"]}}}}
    with pytest.raises(ValueError, match="do not exist"):
        lora.apply_lora(params, stray, lcfg)


def test_embedding_adapters_when_allowed():
    _, graphdef, params = _setup("llama3-tiny")
    lcfg = lora.LoraConfig(targets=(r"^embedding$", r"^lm_head$"), allow_embeddings=True)
    adapters = lora.init_lora(params, lcfg, jax.random.key(0))
    assert adapters["embedding"]["a"].shape == (256, 8) and adapters["embedding"]["b"].shape == (8, 64)
    assert adapters["lm_head"]["a"].shape == (64, 8) and adapters["lm_head"]["b"].shape == (8, 256)
    # One-hot rows: the embedding's A uses fan-in 1 (uniform on [-1, 1]).
    assert 0.5 < float(jnp.abs(adapters["embedding"]["a"]).max()) <= 1.0
    run = _run("llama3-tiny")
    np.testing.assert_array_equal(np.asarray(_run_lora("llama3-tiny")(params, adapters, lcfg)),
                                  np.asarray(run(params, TOKENS)))


def test_initialisation_scales_and_path_stable_keys():
    _, _, params = _setup("llama3-tiny")
    kaiming = lora.init_lora(params, lora.LoraConfig(rank=4), jax.random.key(0))
    a = np.asarray(kaiming["layers"][0]["mlp"]["down"]["a"])   # fan-in = intermediate_size = 128
    assert np.abs(a).max() <= 1 / math.sqrt(128) and np.abs(a).max() > 0.9 / math.sqrt(128)
    a_o = np.asarray(kaiming["layers"][0]["attn"]["o"]["a"])   # fan-in = heads * head_dim = 64
    assert np.abs(a_o).max() <= 1 / math.sqrt(64)
    gaussian = lora.init_lora(params, lora.LoraConfig(rank=4, init="gaussian"), jax.random.key(0))
    std = np.concatenate([np.asarray(ad["a"]).ravel() for _, ad in lora._adapter_items(gaussian)]).std()
    assert abs(std - 1 / 4) < 0.02
    for _, ad in lora._adapter_items(kaiming):
        assert not np.asarray(ad["b"]).any()
    only_q = lora.init_lora(params, lora.LoraConfig(rank=4, targets=(r"layers/\d+/attn/q$",)),
                            jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(only_q["layers"][1]["attn"]["q"]["a"]),
                                  np.asarray(kaiming["layers"][1]["attn"]["q"]["a"]))


def test_init_from_abstract_shapes():
    cfg = models.get_preset("llama3-tiny")
    _, shapes, _ = models.abstract(cfg)
    lcfg = LCFG
    adapters = lora.init_lora(shapes, lcfg, jax.random.key(0))
    abstract = lora.abstract_lora(shapes, lcfg)
    jax.tree.map(lambda x, s: (x.shape == s.shape and x.dtype == s.dtype) or pytest.fail("shape"),
                 adapters, abstract)


# ---------------------------------------------------------------------------
# Sharding


def test_logical_axes_inherit_the_kernels_axes():
    cfg = models.get_preset("llama3-tiny")
    _, shapes, axes = models.abstract(cfg)
    lax_tree = lora.lora_logical_axes(shapes, axes, lora.LoraConfig())
    layer = lax_tree["layers"][0]
    assert layer["attn"]["q"] == {"a": ("embed", None), "b": (None, "heads", "head_dim")}
    assert layer["attn"]["k"] == {"a": ("embed", None), "b": (None, "kv_heads", "head_dim")}
    assert layer["attn"]["o"] == {"a": ("heads", "head_dim", None), "b": (None, "embed")}
    assert layer["mlp"]["down"] == {"a": ("mlp", None), "b": (None, "embed")}


def test_sharded_adapters_give_the_unsharded_forward():
    cfg = models.get_preset("llama3-tiny")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    lcfg = LCFG
    axes = models.abstract(cfg)[2]
    graphdef, params = models.init_params(cfg, seed=0, mesh=mesh)
    adapters = lora.init_lora(params, lcfg, jax.random.key(0), mesh=mesh, base_axes=axes)
    q, o = adapters["layers"][0]["attn"]["q"], adapters["layers"][0]["attn"]["o"]
    assert q["a"].sharding.spec == P("fsdp", None)
    assert q["b"].sharding.spec == P(None, "tensor", None)
    assert o["a"].sharding.spec == P("tensor", None, None)
    assert o["b"].sharding.spec == P(None, "fsdp")
    adapters = _randomise_b(adapters)
    assert adapters["layers"][0]["attn"]["q"]["b"].sharding.spec == P(None, "tensor", None)

    local_params, local_adapters = jax.device_get(params), jax.device_get(adapters)
    unsharded_init = lora.init_lora(local_params, lcfg, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(unsharded_init["layers"][1]["mlp"]["up"]["a"]),
                                  np.asarray(adapters["layers"][1]["mlp"]["up"]["a"]))
    expected = _run_lora("llama3-tiny")(local_params, local_adapters, lcfg)
    run = _run("llama3-tiny")
    with sharding.use_mesh(mesh):
        # A fresh jit traced under the mesh, so the model's activation constraints apply.
        got = jax.jit(lambda p, ad: run(lora.apply_lora(p, ad, lcfg), TOKENS))(params, adapters)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Saving and PEFT export


def test_adapters_only_description_is_json_and_round_trips_the_config():
    _, _, params = _setup("llama3-tiny")
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=(r"layers/\d+/attn/(q|v)$",), rslora=True)
    adapters = lora.init_lora(params, lcfg, jax.random.key(0))
    host, description = lora.adapters_only(adapters, lcfg)
    assert isinstance(host["layers"][0]["attn"]["q"]["a"], np.ndarray)
    restored = json.loads(json.dumps(description))
    assert lora.config_from_description(restored) == lcfg
    assert restored["paths"]["layers/1/attn/v"] == {"a": [64, 4], "b": [4, 2, 16]}
    assert restored["scale"] == pytest.approx(4.0)


def _hf_linear(kernel, n_in):
    """A prefjax einsum kernel [*in, *out] as a Hugging Face Linear weight [out, in]."""
    k = np.asarray(kernel, np.float64)
    fan_in = math.prod(k.shape[:n_in])
    return k.reshape(fan_in, -1).T


def _read_safetensors(filename):
    return safetensors_format.read(filename)


def test_export_peft_names_shapes_and_the_hf_side_update(tmp_path):
    cfg, _, params = _setup("llama3-tiny")
    lcfg = LCFG
    adapters = _randomise_b(lora.init_lora(params, lcfg, jax.random.key(0)))
    shapes = lora.export_peft(adapters, lcfg, cfg, str(tmp_path))
    d, f, n, kv, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hf_in_out = {"self_attn.q_proj": (d, n * h), "self_attn.k_proj": (d, kv * h),
                 "self_attn.v_proj": (d, kv * h), "self_attn.o_proj": (n * h, d),
                 "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}
    expected = {}
    for i in range(cfg.num_layers):
        for module, (fan_in, fan_out) in hf_in_out.items():
            prefix = f"base_model.model.model.layers.{i}.{module}"
            expected[prefix + ".lora_A.weight"] = (4, fan_in)
            expected[prefix + ".lora_B.weight"] = (fan_out, 4)
    assert shapes == expected

    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["bias"] == "none"
    assert config["fan_in_fan_out"] is False and config["use_rslora"] is False
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    # The update PEFT applies, W_hf + scale * B_hf @ A_hf, is our merged kernel in HF layout.
    tensors = lora.peft_tensors(adapters)
    merged = lora.merge(params, adapters, lcfg)
    checks = (("attn", "q", "self_attn.q_proj", 1), ("attn", "o", "self_attn.o_proj", 2),
              ("mlp", "down", "mlp.down_proj", 1))
    for group, name, module, n_in in checks:
        prefix = f"base_model.model.model.layers.1.{module}"
        a_hf = tensors[prefix + ".lora_A.weight"].astype(np.float64)
        b_hf = tensors[prefix + ".lora_B.weight"].astype(np.float64)
        want = _hf_linear(merged["layers"][1][group][name], n_in)
        got = _hf_linear(params["layers"][1][group][name], n_in) + lcfg.scale * b_hf @ a_hf
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    loaded = _read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in loaded.items()} == expected
    for key, value in tensors.items():
        np.testing.assert_array_equal(loaded[key], value)
        assert loaded[key].dtype == np.float32


def test_export_peft_subset_of_layers_uses_an_exact_regex(tmp_path):
    cfg, _, params = _setup("llama3-tiny")
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=(r"layers/1/attn/(q|v)$",))
    adapters = lora.init_lora(params, lcfg, jax.random.key(0))
    lora.export_peft(adapters, lcfg, cfg, str(tmp_path / "out"), base_model_name_or_path="org/model")
    config = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == "org/model"
    pattern = config["target_modules"]
    assert isinstance(pattern, str)
    hf_modules = [f"model.layers.{i}.{m}" for i in range(2)
                  for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj")]
    # PEFT full-matches a string target_modules against module names.
    assert [m for m in hf_modules if re.fullmatch(pattern, m)] == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert os.path.getsize(tmp_path / "out" / "adapter_model.safetensors") > 0


def test_export_peft_embeddings(tmp_path):
    cfg, _, params = _setup("llama3-tiny")
    lcfg = lora.LoraConfig(rank=2, targets=(r"^embedding$", r"^lm_head$"), allow_embeddings=True)
    adapters = lora.init_lora(params, lcfg, jax.random.key(0))
    shapes = lora.export_peft(adapters, lcfg, cfg, str(tmp_path))
    assert shapes == {
        "base_model.model.model.embed_tokens.lora_embedding_A": (2, 256),
        "base_model.model.model.embed_tokens.lora_embedding_B": (64, 2),
        "base_model.model.lm_head.lora_A.weight": (2, 64),
        "base_model.model.lm_head.lora_B.weight": (256, 2),
    }
    tied_cfg, _, tied_params = _setup("gemma2-tiny")
    tied = lora.init_lora(tied_params, lora.LoraConfig(targets=(r"^embedding$",), allow_embeddings=True),
                          jax.random.key(0))
    with pytest.raises(ValueError, match="tied"):
        lora.export_peft(tied, lcfg, tied_cfg, str(tmp_path / "tied"))


