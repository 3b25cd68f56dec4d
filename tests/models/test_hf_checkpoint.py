"""Hugging Face import/export: parity with transformers' logits, sharded streaming import,
bit-exact round trips, and clear errors for folders that do not match their config.

The committed fixtures (tests/fixtures/hf, built by scripts/make_hf_fixtures.py) hold
transformers' float32 logits, so parity is checked without torch; when torch and
transformers are importable, the live tests also load prefjax's exports in transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax import models, sharding
from prefjax.models import hf_checkpoint, hf_config, hf_layout, safetensors_format
from prefjax.models.tokenizer import TokenizerError

FIXTURES = Path(__file__).parent.parent / "fixtures" / "hf"
FAMILIES = ["llama", "llama2", "mistral", "qwen2", "qwen2_tied", "qwen3", "gemma", "gemma2", "llama_sharded"]
EXPORTABLE_PRESETS = ["llama2-tiny", "llama3-tiny", "mistral-tiny", "qwen2-tiny", "qwen2-tiny-tied",
                      "qwen3-tiny", "gemma-tiny", "gemma2-tiny"]


def _logits(ckpt_or_cfg, graphdef, params, ids, mask=None):
    model = nnx.merge(graphdef, params)
    segments = None if mask is None else jnp.asarray(mask, jnp.int32)
    hidden, _ = model(jnp.asarray(ids), segments_BxT=segments)
    return np.asarray(model.logits(hidden))


def _flat(params):
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _randomised(cfg, seed=0):
    """Random params (norm scales and biases too, so no mapping hides), made in numpy."""
    graphdef, shapes, _ = models.abstract(cfg)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
    return graphdef, params


# ---------------------------------------------------------------------------
# Parity with transformers (committed logits)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_imported_fixture_matches_transformers_logits(family):
    folder = FIXTURES / family
    ckpt = hf_checkpoint.load(folder)
    expected = np.load(folder / "expected.npz")
    mask = expected["attention_mask"]
    got = _logits(ckpt, ckpt.graphdef, ckpt.params, expected["input_ids"], mask)
    assert got.shape == expected["logits"].shape
    # Padded positions are implementation-defined; compare real tokens only.
    np.testing.assert_allclose(got[mask == 1], expected["logits"][mask == 1], atol=1e-4, rtol=0)
    assert ckpt.tokenizer is not None and ckpt.tokenizer.vocab_size <= ckpt.cfg.vocab_size


def test_config_features_of_each_family_are_read():
    cfgs = {f: hf_checkpoint.load_config(FIXTURES / f) for f in FAMILIES}
    assert cfgs["llama"].rope_scaling["rope_type"] == "llama3" and cfgs["llama"].rope_theta == 500_000.0
    assert cfgs["llama2"].rope_scaling is None
    assert cfgs["mistral"].sliding_window == 4 and cfgs["mistral"].sliding_layers == "all"
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].tie_embeddings and cfgs["qwen2"].sliding_layers == "none"
    assert cfgs["qwen2_tied"].tie_embeddings
    assert cfgs["qwen3"].qk_norm and not cfgs["qwen3"].qkv_bias
    assert cfgs["gemma"].norm_offset and cfgs["gemma"].scale_embeddings and cfgs["gemma"].activation == "gelu_tanh"
    g2 = cfgs["gemma2"]
    assert (g2.post_norms, g2.attn_logit_softcap, g2.final_logit_softcap, g2.query_pre_attn_scalar) == (
        True, 50.0, 30.0, 24.0)
    assert g2.sliding_layers == "even" and [g2.layer_window(i) for i in range(3)] == [4, None, 4]


def test_sharded_index_gives_the_same_params_as_one_file():
    one = _flat(hf_checkpoint.load(FIXTURES / "llama", with_tokenizer=False).params)
    split = _flat(hf_checkpoint.load(FIXTURES / "llama_sharded", with_tokenizer=False).params)
    assert one.keys() == split.keys()
    for key in one:
        np.testing.assert_array_equal(one[key], split[key])


@pytest.mark.parametrize("mesh_shape", [{"data": 1, "fsdp": 8, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2},
                                        {"data": 1, "fsdp": 1, "tensor": 8}])
def test_import_places_params_in_their_shards(mesh_shape):
    mesh = sharding.make_mesh(mesh_shape)
    single = hf_checkpoint.load(FIXTURES / "qwen2", with_tokenizer=False)
    sharded = hf_checkpoint.load(FIXTURES / "qwen2", mesh=mesh, with_tokenizer=False)
    want = models.param_shardings(sharded.cfg, mesh)
    for (path, leaf), target in zip(jax.tree_util.tree_flatten_with_path(sharded.params)[0],
                                     jax.tree.leaves(want)):
        assert leaf.sharding.is_equivalent_to(target, leaf.ndim), jax.tree_util.keystr(path)
    flat_single, flat_sharded = _flat(single.params), _flat(sharded.params)
    for key in flat_single:
        np.testing.assert_array_equal(flat_single[key], flat_sharded[key])


def test_import_reads_only_each_shards_slice(monkeypatch):
    """Streaming: each callback asks for one shard's slice, never a whole large tensor."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    requested = []
    real = jax.make_array_from_callback

    def spy(shape, target, callback):
        def recording(index):
            out = callback(index)
            requested.append((shape, out.shape))
            return out
        return real(shape, target, recording)

    monkeypatch.setattr(hf_checkpoint.jax, "make_array_from_callback", spy)
    ckpt = hf_checkpoint.load(FIXTURES / "llama", mesh=mesh, with_tokenizer=False)
    embed_reads = [got for shape, got in requested if shape == (ckpt.cfg.vocab_size, ckpt.cfg.hidden_size)]
    # The embedding [V, D] is split over fsdp on D: each read is 1/8 of it.
    assert embed_reads and all(got == (ckpt.cfg.vocab_size, ckpt.cfg.hidden_size // 8) for got in embed_reads)


def test_import_casts_to_the_requested_param_dtype():
    ckpt = hf_checkpoint.load(FIXTURES / "gemma", with_tokenizer=False, param_dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(ckpt.params))
    f32 = hf_checkpoint.load(FIXTURES / "gemma", with_tokenizer=False)
    np.testing.assert_array_equal(np.asarray(ckpt.params["embedding"]),
                                  np.asarray(f32.params["embedding"]).astype(jnp.bfloat16))


# ---------------------------------------------------------------------------
# Export and round trips
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "qwen2_tied"])
def test_export_of_an_import_reproduces_the_checkpoint_tensors(family, tmp_path):
    ckpt = hf_checkpoint.load(FIXTURES / family)
    files = hf_checkpoint.save(tmp_path, ckpt.cfg, ckpt.params, copy_from=ckpt.folder)
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    original = safetensors_format.read(FIXTURES / family / "model.safetensors")
    exported = safetensors_format.read(tmp_path / "model.safetensors")
    expected_names = {n for n in original if not hf_layout.is_ignorable(n, ckpt.cfg)}
    assert set(exported) == expected_names
    for name in expected_names:
        assert exported[name].dtype == original[name].dtype
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    config = json.loads((tmp_path / "config.json").read_text())
    source = json.loads((FIXTURES / family / "config.json").read_text())
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if key in source:
            assert config[key] == source[key]


@pytest.mark.parametrize("name", EXPORTABLE_PRESETS)
def test_export_then_import_is_bit_exact(name, tmp_path):
    cfg = models.get_preset(name)
    graphdef, params = _randomised(cfg)
    hf_checkpoint.save(tmp_path, cfg, params)
    back_cfg = hf_checkpoint.load_config(tmp_path)
    assert back_cfg == cfg.replace(max_position_embeddings=cfg.max_position_embeddings)
    back = hf_checkpoint.load_params(tmp_path, back_cfg)
    a, b = _flat(params), _flat(back)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_export_splits_into_indexed_files_that_import_back(tmp_path):
    cfg = models.get_preset("llama2-tiny")
    _, params = _randomised(cfg)
    files = hf_checkpoint.save(tmp_path, cfg, params, max_shard_bytes=40_000)
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and hf_checkpoint.INDEX_FILE in files and "model.safetensors" not in files
    index = json.loads((tmp_path / hf_checkpoint.INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # no file exceeds the limit unless it holds a single tensor
        f = safetensors_format.SafetensorsFile(tmp_path / shard)
        sizes = [f.info(n).end - f.info(n).begin for n in f.names()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    back = _flat(hf_checkpoint.load_params(tmp_path, cfg))
    for key, value in _flat(params).items():
        np.testing.assert_array_equal(back[key], value)


def test_export_in_bfloat16(tmp_path):
    cfg = models.get_preset("qwen3-tiny")
    _, params = _randomised(cfg)
    hf_checkpoint.save(tmp_path, cfg, params, dtype="bfloat16")
    f = safetensors_format.SafetensorsFile(tmp_path / "model.safetensors")
    assert {f.info(n).dtype for n in f.names()} == {np.dtype(jnp.bfloat16)}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back = hf_checkpoint.load_params(tmp_path, cfg)
    np.testing.assert_array_equal(np.asarray(back["embedding"]),
                                  np.asarray(params["embedding"]).astype(jnp.bfloat16).astype(np.float32))


def test_export_of_sharded_params_equals_unsharded_export(tmp_path):
    cfg = models.get_preset("gemma2-tiny")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    _, params = _randomised(cfg)
    placed = jax.device_put(params, models.param_shardings(cfg, mesh))
    hf_checkpoint.save(tmp_path / "a", cfg, params)
    hf_checkpoint.save(tmp_path / "b", cfg, placed)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------
# Config translation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXPORTABLE_PRESETS + ["llama3-8b", "qwen2.5-0.5b", "gemma2-2b"])
def test_config_round_trip(name):
    cfg = models.get_preset(name)
    assert hf_config.from_hf_config(hf_config.to_hf_config(cfg)) == cfg


def test_transformers_4_config_layout_is_read():
    config = json.loads((FIXTURES / "llama" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    assert hf_config.from_hf_config(config) == hf_checkpoint.load_config(FIXTURES / "llama")


def test_qwen_sliding_window_uses_max_window_layers():
    config = json.loads((FIXTURES / "qwen2" / "config.json").read_text())
    config.pop("layer_types")
    config.update(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    cfg = hf_config.from_hf_config(config)
    assert [cfg.layer_window(i) for i in range(cfg.num_layers)] == [None, 8]


@pytest.mark.parametrize("change, field", [
    ({"model_type": "falcon"}, "model_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0}}, "low_freq_factor"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"hidden_size": "32"}, "hidden_size"),
    ({"num_attention_heads": 3}, "num_heads"),
])
def test_unsupported_or_malformed_config_fields_are_named(change, field):
    config = json.loads((FIXTURES / "llama" / "config.json").read_text())
    config.update(change)
    with pytest.raises(hf_config.HFConfigError, match=field) as err:
        hf_config.from_hf_config(config, "some/folder/config.json")
    assert "some/folder/config.json" in str(err.value)


# ---------------------------------------------------------------------------
# Folders that do not match
# ---------------------------------------------------------------------------

def _copy(family, tmp_path):
    dest = tmp_path / family
    shutil.copytree(FIXTURES / family, dest)
    return dest


def _rewrite_tensors(folder, edit):
    tensors = safetensors_format.read(folder / "model.safetensors")
    edit(tensors)
    safetensors_format.write(folder / "model.safetensors", tensors, metadata={"format": "pt"})


def test_missing_files_are_named(tmp_path):
    folder = _copy("llama", tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf_checkpoint.load(folder)
    folder = _copy("qwen3", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_checkpoint.load(folder)
    folder = _copy("gemma", tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        hf_checkpoint.load(folder)
    assert hf_checkpoint.load(folder, with_tokenizer=False).tokenizer is None


def test_malformed_config_json_is_named(tmp_path):
    folder = _copy("llama", tmp_path)
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(hf_config.HFConfigError, match=r"config.json: not valid JSON"):
        hf_checkpoint.load(folder)


def test_missing_wrongly_shaped_and_unknown_tensors(tmp_path):
    folder = _copy("llama", tmp_path)
    _rewrite_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf_checkpoint.CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        hf_checkpoint.load(folder)

    folder = _copy("qwen2", tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                                   t["model.layers.0.self_attn.k_proj.weight"][:16]}))
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"k_proj.weight' has shape \[16, 64\].*\[32, 64\]"):
        hf_checkpoint.load(folder)

    folder = _copy("qwen3", tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}))
    with pytest.raises(hf_checkpoint.CheckpointError, match="o_proj.bias"):
        hf_checkpoint.load(folder)


def test_rotary_buffers_and_tied_lm_head_are_ignored(tmp_path):
    folder = _copy("gemma", tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({
        "lm_head.weight": t["model.embed_tokens.weight"],
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    loaded = _flat(hf_checkpoint.load(folder, with_tokenizer=False).params)
    reference = _flat(hf_checkpoint.load(FIXTURES / "gemma", with_tokenizer=False).params)
    for key in reference:
        np.testing.assert_array_equal(loaded[key], reference[key])


def test_broken_index_is_named(tmp_path):
    folder = _copy("llama_sharded", tmp_path)
    (folder / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00003-of-00005.safetensors"):
        hf_checkpoint.load(folder)
    folder = _copy("llama_sharded", tmp_path / "b")
    index = json.loads((folder / hf_checkpoint.INDEX_FILE).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00005.safetensors"
    (folder / hf_checkpoint.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(hf_checkpoint.CheckpointError, match="model.norm.weight"):
        hf_checkpoint.load(folder)


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    folder = _copy("qwen2", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 64  # smaller than the fixture tokenizer's vocabulary
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="vocab_size 64"):
        hf_checkpoint.load(folder)


# ---------------------------------------------------------------------------
# Live comparison against transformers (only where torch is installed)
# ---------------------------------------------------------------------------

def _transformers_logits(folder, ids, mask):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                              attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)))
    return out.logits.numpy()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2_tied", "gemma2"])
def test_live_transformers_on_fixture(family):
    pytest.importorskip("torch")
    expected = np.load(FIXTURES / family / "expected.npz")
    ids, mask = expected["input_ids"], expected["attention_mask"]
    want = _transformers_logits(FIXTURES / family, ids, mask)
    ckpt = hf_checkpoint.load(FIXTURES / family, with_tokenizer=False)
    got = _logits(ckpt, ckpt.graphdef, ckpt.params, ids, mask)
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", EXPORTABLE_PRESETS)
def test_live_transformers_loads_prefjax_exports(name, tmp_path):
    pytest.importorskip("torch")
    cfg = models.get_preset(name)
    graphdef, params = _randomised(cfg, seed=3)
    # Longer than the tiny presets' 16-token windows, with a right-padded row.
    ids = np.asarray(jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.vocab_size))
    mask = np.ones_like(ids)
    mask[1, 19:] = 0
    hf_checkpoint.save(tmp_path, cfg, params)
    want = _transformers_logits(tmp_path, ids, mask)
    got = _logits(cfg, graphdef, params, ids, mask)
    scale = max(1.0, float(np.abs(want).max()) / 10)
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-4 * scale, rtol=0)
