"""Reward models as Hugging Face *ForSequenceClassification folders: import, export, PEFT.

The committed fixtures (tests/fixtures/hf_reward, built by
`scripts/make_hf_fixtures.py --reward`) hold transformers' float32 scores for unpadded,
right-padded and left-padded rows, so parity is checked without torch. Where torch,
transformers (and peft) are importable, the live tests load prefjax's exports in them.

How prefjax reproduces transformers' score: transformers 5 reads the rightmost token that
is not pad_token_id, and with no position_ids it numbers every row 0..T-1, pads included
(a left-padded row's first real token sits at position = number of pads). prefjax runs
the decoder with segments = attention_mask and reads the last token whose mask is 1 (the
rows end in EOS, never a pad); default positions reproduce transformers' numbering, and
positions counted over real tokens agree too (RoPE sees only position differences).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models, sharding
from prefjax.models import hf_checkpoint, hf_config, lora, safetensors_format

FIXTURES = Path(__file__).parent.parent / "fixtures"
REWARD = FIXTURES / "hf_reward"
CAUSAL = FIXTURES / "hf"
REWARD_FIXTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "qwen2_multi"]
# Causal fixtures a reward model is exported from: one per family (qwen2 has an lm_head to drop).
SOURCES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"]
ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
                 "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
                 "gemma": "GemmaForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification"}


def _last_real(mask: np.ndarray) -> np.ndarray:
    """Index of each row's last token whose attention_mask is 1 (left or right padding)."""
    t = mask.shape[1]
    return t - 1 - np.argmax(mask[:, ::-1] == 1, axis=1)


def _scores(graphdef, params, head, ids, mask, positions: str = "default") -> np.ndarray:
    """[N, L]: hidden state at each row's last real token times the head."""
    mask = np.asarray(mask, np.int32)
    pos = None
    if positions == "counted":  # 0, 1, ... over real tokens; pads 0 (they see nothing)
        pos = jnp.asarray(np.maximum(np.cumsum(mask, axis=1) - 1, 0) * mask)
    hidden, _ = models.apply(graphdef, params, jnp.asarray(ids), segments_BxT=jnp.asarray(mask), positions_BxT=pos)
    last = hidden[jnp.arange(ids.shape[0]), jnp.asarray(_last_real(mask))]
    return np.asarray(jnp.dot(last.astype(jnp.float32), head, precision=jax.lax.Precision.HIGHEST))


def _flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    return safetensors_format.read(str(folder / "model.safetensors"))


def _batch(ckpt_vocab: int, pad: int, eos: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows ending in EOS: unpadded, right-padded, left-padded (ids >= 16 are regular tokens)."""
    rng = np.random.default_rng(seed)
    real = (10, 6, 4)
    ids = np.full((3, 10), pad, np.int32)
    mask = np.zeros((3, 10), np.int32)
    for row, n in enumerate(real):
        tokens = rng.integers(16, ckpt_vocab, size=n)
        tokens[-1] = eos
        where = slice(10 - n, 10) if row == 2 else slice(0, n)
        ids[row, where], mask[row, where] = tokens, 1
    return ids, mask


def _fresh_head(hidden: int, num_labels: int, seed: int = 0) -> jax.Array:
    # The contract's fresh-head scale N(0, 1/(D+1)), times 10 so the scores are not all near 0.
    rng = np.random.default_rng(seed)
    return jnp.asarray(10 * rng.standard_normal((hidden, num_labels)) / np.sqrt(hidden + 1), jnp.float32)


def _export_from_causal(source: str, out: Path, num_labels: int, **kwargs):
    """A causal fixture's decoder + a fresh head exported as a reward model."""
    ckpt = hf_checkpoint.load(CAUSAL / source)
    head = _fresh_head(ckpt.cfg.hidden_size, num_labels)
    labels = ["reward"] if num_labels == 1 else [f"attr_{i}" for i in range(num_labels)]
    written = hf_checkpoint.save_reward_model(out, ckpt.cfg, ckpt.params, head, labels=labels,
                                              pad_token_id=ckpt.tokenizer.pad_token_id,
                                              copy_from=ckpt.folder, **kwargs)
    return ckpt, head, labels, written


# ---------------------------------------------------------------------------
# Parity with transformers' committed scores
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", REWARD_FIXTURES)
def test_committed_fixture_scores_are_reproduced(name):
    folder = REWARD / name
    rm = hf_checkpoint.load_reward_model(folder)
    expected = np.load(folder / "expected.npz")
    ids, mask, want = expected["input_ids"], expected["attention_mask"], expected["logits"]
    assert mask[:, 0].min() == 0 and mask[:, -1].min() == 0  # the batch has left and right padding
    for positions in ("default", "counted"):
        got = _scores(rm.graphdef, rm.params, rm.head, ids, mask, positions)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"{name}, {positions} positions")
    # Not vacuous: the scores vary across rows, and a pad read instead of the last token would differ.
    assert np.ptp(want, axis=0).min() > 0.05


@pytest.mark.parametrize("name", REWARD_FIXTURES)
def test_loaded_reward_model_has_no_lm_head_and_reads_its_fields(name):
    folder = REWARD / name
    raw = json.loads((folder / "config.json").read_text())
    rm = hf_checkpoint.load_reward_model(folder)
    assert "lm_head" not in rm.params
    assert rm.head.dtype == jnp.float32 and rm.head.shape == (rm.cfg.hidden_size, len(rm.labels))
    np.testing.assert_array_equal(np.asarray(rm.head), _tensors(folder)["score.weight"].T)
    assert rm.labels == tuple(raw["id2label"][str(i)] for i in range(len(raw["id2label"])))
    assert rm.pad_token_id == raw["pad_token_id"] != raw["eos_token_id"]
    assert rm.normalization is None and rm.tokenizer.pad_token_id == rm.pad_token_id
    assert hf_checkpoint.is_reward_model_folder(folder)
    assert not hf_checkpoint.is_reward_model_folder(CAUSAL / "qwen2")
    if name == "qwen2_multi":
        assert rm.labels == ("helpfulness", "correctness", "verbosity")
    else:
        assert rm.labels == ("LABEL_0",)


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", REWARD_FIXTURES)
def test_import_export_import_is_bit_exact(name, tmp_path):
    folder = REWARD / name
    rm = hf_checkpoint.load_reward_model(folder)
    norm = {"mean": [0.5 * i - 1.0 for i in range(len(rm.labels))], "std": [2.0 + i for i in range(len(rm.labels))]}
    hf_checkpoint.save_reward_model(tmp_path / "a", rm.cfg, rm.params, rm.head, labels=rm.labels,
                                    pad_token_id=rm.pad_token_id, normalization=norm, copy_from=rm.folder)
    # Every tensor transformers wrote comes back bit for bit, and nothing else (no lm_head).
    original, exported = _tensors(folder), _tensors(tmp_path / "a")
    assert sorted(exported) == sorted(original) and "lm_head.weight" not in exported
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)
        assert exported[key].dtype == original[key].dtype

    again = hf_checkpoint.load_reward_model(tmp_path / "a")
    assert again.cfg == rm.cfg and again.labels == rm.labels and again.pad_token_id == rm.pad_token_id
    assert again.normalization == norm
    np.testing.assert_array_equal(np.asarray(again.head), np.asarray(rm.head))
    first, second = _flat(rm.params), _flat(again.params)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)

    # The reward fields (and the untouched tie_word_embeddings) are those transformers wrote.
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    raw = json.loads((folder / "config.json").read_text())
    for key in ("architectures", "id2label", "label2id", "pad_token_id", "eos_token_id", "bos_token_id",
                "tie_word_embeddings", "model_type", "hidden_size", "vocab_size"):
        assert config[key] == raw[key], key
    assert config["num_labels"] == len(rm.labels)
    assert config["prefjax_reward_normalization"] == norm

    # A second export of the re-import writes the same files byte for byte.
    hf_checkpoint.save_reward_model(tmp_path / "b", again.cfg, again.params, again.head, labels=again.labels,
                                    pad_token_id=again.pad_token_id, normalization=again.normalization,
                                    copy_from=tmp_path / "a")
    for filename in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / filename).read_bytes() == (tmp_path / "b" / filename).read_bytes(), filename


@pytest.mark.parametrize("source,num_labels", [(s, 3 if s in ("qwen2", "gemma2") else 1) for s in SOURCES])
def test_export_from_a_causal_policy_drops_lm_head(source, num_labels, tmp_path):
    ckpt, head, labels, written = _export_from_causal(source, tmp_path, num_labels)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[ckpt.cfg.family]]
    assert config["num_labels"] == num_labels
    assert config["id2label"] == {str(i): name for i, name in enumerate(labels)}
    assert config["label2id"] == {name: i for i, name in enumerate(labels)}
    assert config["pad_token_id"] == ckpt.tokenizer.pad_token_id
    assert config["tie_word_embeddings"] == ckpt.cfg.tie_embeddings
    assert "prefjax_reward_normalization" not in config
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(written)

    tensors = _tensors(tmp_path)
    causal = _tensors(CAUSAL / source)
    assert set(tensors) == (set(causal) - {"lm_head.weight"}) | {"score.weight"}
    np.testing.assert_array_equal(tensors["score.weight"], np.asarray(head).T)

    rm = hf_checkpoint.load_reward_model(tmp_path)
    assert "lm_head" not in rm.params and rm.labels == tuple(labels)
    # The reward model's decoder is the policy's: the same hidden states, read at the last token.
    ids, mask = _batch(ckpt.cfg.vocab_size, rm.pad_token_id, ckpt.tokenizer.eos_token_id)
    np.testing.assert_array_equal(_scores(rm.graphdef, rm.params, rm.head, ids, mask),
                                  _scores(ckpt.graphdef, ckpt.params, head, ids, mask))


def test_bfloat16_export_keeps_a_float32_head_and_sharded_files(tmp_path):
    ckpt = hf_checkpoint.load(CAUSAL / "llama")
    head = _fresh_head(ckpt.cfg.hidden_size, 2)
    hf_checkpoint.save_reward_model(tmp_path / "bf16", ckpt.cfg, ckpt.params, head, labels=["a", "b"],
                                    pad_token_id=ckpt.tokenizer.pad_token_id, dtype="bfloat16")
    tensors = _tensors(tmp_path / "bf16")
    assert tensors["score.weight"].dtype.name == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # Default dtype: the decoder's own, and the head's own (float32).
    written = hf_checkpoint.save_reward_model(tmp_path / "sharded", ckpt.cfg, ckpt.params, head, labels=["a", "b"],
                                              pad_token_id=ckpt.tokenizer.pad_token_id, max_shard_bytes=40_000)
    assert hf_checkpoint.INDEX_FILE in written
    rm = hf_checkpoint.load_reward_model(tmp_path / "sharded", with_tokenizer=False)
    assert rm.tokenizer is None and rm.pad_token_id == ckpt.tokenizer.pad_token_id
    np.testing.assert_array_equal(np.asarray(rm.head), np.asarray(head))


def test_load_reward_model_on_a_mesh_shards_the_decoder_and_replicates_the_head():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rm = hf_checkpoint.load_reward_model(REWARD / "qwen2_multi", mesh=mesh)
    assert rm.head.sharding.is_fully_replicated and len(rm.head.sharding.device_set) == 8
    want = models.param_shardings(rm.cfg, mesh)
    assert rm.params["embedding"].sharding == want["embedding"] and "lm_head" not in want
    plain = hf_checkpoint.load_reward_model(REWARD / "qwen2_multi")
    np.testing.assert_array_equal(np.asarray(rm.head), np.asarray(plain.head))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

def _copy(name: str, tmp_path: Path, edit=None, base: Path = REWARD) -> Path:
    folder = tmp_path / name
    shutil.copytree(base / name, folder)
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_score_weight_shape_mismatch_names_file_tensor_shapes_and_num_labels(tmp_path):
    def two_labels(config):
        config["id2label"] = {"0": "a", "1": "b"}
        config["label2id"] = {"a": 0, "b": 1}
    folder = _copy("qwen2_multi", tmp_path, two_labels)
    with pytest.raises(hf_checkpoint.RewardHeadError) as err:
        hf_checkpoint.load_reward_model(folder)
    message = str(err.value)
    assert str(folder / "model.safetensors") in message and "'score.weight'" in message
    assert "[3, 32]" in message and "num_labels=2" in message and "hidden_size=32" in message
    assert "[2, 32]" in message


def test_num_labels_disagreeing_with_id2label_is_refused(tmp_path):
    folder = _copy("qwen2_multi", tmp_path, lambda c: c.update(num_labels=2))
    with pytest.raises(hf_config.HFConfigError, match=r"config\.json: field num_labels=2 but id2label has 3"):
        hf_checkpoint.load_reward_model(folder)


def test_missing_score_weight_is_named(tmp_path):
    folder = _copy("llama", tmp_path)
    tensors = _tensors(folder)
    del tensors["score.weight"]
    safetensors_format.write(str(folder / "model.safetensors"), tensors, metadata={"format": "pt"})
    with pytest.raises(hf_checkpoint.RewardHeadError, match="has no 'score.weight' tensor"):
        hf_checkpoint.load_reward_model(folder)


def test_no_pad_token_id_anywhere_is_refused(tmp_path):
    folder = _copy("llama", tmp_path, lambda c: c.pop("pad_token_id"))
    with pytest.raises(hf_checkpoint.PadTokenError) as err:
        hf_checkpoint.load_reward_model(folder, with_tokenizer=False)
    message = str(err.value)
    assert str(folder / "config.json") in message and "no pad_token_id" in message
    assert "not the pad id" in message and "not an EOS id" in message
    # With the tokenizer loaded, its pad token is used.
    rm = hf_checkpoint.load_reward_model(folder)
    assert rm.pad_token_id == rm.tokenizer.pad_token_id == 2


def test_saving_without_a_pad_id_or_with_the_eos_id_is_refused(tmp_path):
    ckpt = hf_checkpoint.load(CAUSAL / "llama")
    head = _fresh_head(ckpt.cfg.hidden_size, 1)
    save = lambda pad: hf_checkpoint.save_reward_model(
        tmp_path / "out", ckpt.cfg, ckpt.params, head, labels=["reward"], pad_token_id=pad, copy_from=ckpt.folder)
    with pytest.raises(hf_checkpoint.PadTokenError, match="no pad_token_id.*pass pad_token_id= a token id that is not"):
        save(None)
    with pytest.raises(hf_checkpoint.PadTokenError, match=r"pad_token_id=999 is not a token id in \[0, 256\)"):
        save(999)
    # Llama 3's config.json lists two EOS ids; both are refused, as is the tokenizer's.
    eos_ids = json.loads((CAUSAL / "llama" / "config.json").read_text())["eos_token_id"]
    assert ckpt.tokenizer.eos_token_id in eos_ids and len(eos_ids) == 2
    for eos in eos_ids:
        with pytest.raises(hf_checkpoint.PadTokenError) as err:
            save(eos)
        message = str(err.value)
        assert f"pad_token_id={eos} is also an EOS id" in message
        assert "read the token BEFORE the EOS" in message and "Pass a pad_token_id that is not an EOS id" in message
    assert not (tmp_path / "out").exists()
    # The same check, callable before training (nothing written).
    with pytest.raises(hf_checkpoint.PadTokenError, match="workdir/hf_export: pad_token_id=6 is also an EOS id"):
        hf_checkpoint.check_reward_pad_id(6, ckpt.cfg, ckpt.folder, "workdir/hf_export")
    hf_checkpoint.check_reward_pad_id(ckpt.tokenizer.pad_token_id, ckpt.cfg, ckpt.folder, "workdir/hf_export")


def test_head_and_labels_must_agree(tmp_path):
    ckpt = hf_checkpoint.load(CAUSAL / "qwen3", with_tokenizer=False)
    pad = 0
    save = lambda head, labels, **kw: hf_checkpoint.save_reward_model(
        tmp_path, ckpt.cfg, ckpt.params, head, labels=labels, pad_token_id=pad, **kw)
    with pytest.raises(hf_checkpoint.RewardHeadError, match=r"head has shape \[16, 1\]; expected \[hidden_size=32"):
        save(jnp.zeros((16, 1)), ["reward"])
    with pytest.raises(hf_checkpoint.RewardHeadError, match=r"2 label name\(s\) \['a', 'b'\] for a reward head with 3"):
        save(jnp.zeros((32, 3)), ["a", "b"])
    with pytest.raises(hf_checkpoint.RewardHeadError, match="distinct non-empty"):
        save(jnp.zeros((32, 2)), ["a", "a"])
    with pytest.raises(hf_config.HFConfigError, match=r"normalization: 'std' should be 2 finite number"):
        save(jnp.zeros((32, 2)), ["a", "b"], normalization={"mean": [0.0, 0.0], "std": [1.0]})
    with pytest.raises(hf_config.HFConfigError, match=r"normalization: 'std' should be positive"):
        save(jnp.zeros((32, 2)), ["a", "b"], normalization={"mean": np.zeros(2), "std": np.array([1.0, 0.0])})


def test_bad_normalization_in_config_json_names_file_and_field(tmp_path):
    folder = _copy("llama", tmp_path, lambda c: c.update(prefjax_reward_normalization={"mean": [0.0]}))
    with pytest.raises(hf_config.HFConfigError) as err:
        hf_checkpoint.load_reward_model(folder)
    assert str(folder / "config.json") in str(err.value) and "prefjax_reward_normalization" in str(err.value)


def test_causal_folder_is_not_a_reward_model_and_back():
    with pytest.raises(hf_checkpoint.NotARewardModelError) as err:
        hf_checkpoint.load_reward_model(CAUSAL / "qwen2")
    message = str(err.value)
    assert str(CAUSAL / "qwen2" / "config.json") in message and "['Qwen2ForCausalLM']" in message
    assert "no score head" in message and "loss_name=bradley_terry" in message and "rating_regression" in message
    with pytest.raises(hf_checkpoint.CheckpointError, match="is a reward model .*load_reward_model"):
        hf_checkpoint.load(REWARD / "qwen2")


# ---------------------------------------------------------------------------
# LoRA reward models: PEFT (SEQ_CLS) export and merged export
# ---------------------------------------------------------------------------

LCFG = lora.LoraConfig(rank=4, alpha=8.0)


def _lora_reward_model():
    ckpt = hf_checkpoint.load(CAUSAL / "qwen2")
    # Random A and B (a fresh adapter's B is zero, a no-op), drawn in numpy: no initialiser to compile.
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                            lora.abstract_lora(ckpt.params, LCFG))
    head = _fresh_head(ckpt.cfg.hidden_size, 2, seed=5)
    return ckpt, adapters, head


def test_peft_seq_cls_export_and_merged_export(tmp_path):
    ckpt, adapters, head = _lora_reward_model()
    shapes = lora.export_peft(adapters, LCFG, ckpt.cfg, str(tmp_path / "peft"), task_type="SEQ_CLS",
                              reward_head=head, base_model_name_or_path=str(ckpt.folder))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert shapes[lora.PEFT_SCORE_WEIGHT] == (2, ckpt.cfg.hidden_size)
    saved = safetensors_format.read(str(tmp_path / "peft" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(saved[lora.PEFT_SCORE_WEIGHT], np.asarray(head).T)
    assert set(saved) - {lora.PEFT_SCORE_WEIGHT} == set(lora.peft_tensors(adapters))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved

    # Merged export: a plain reward-model folder scoring like the adapted model.
    merged = lora.merge(ckpt.params, adapters, LCFG)
    hf_checkpoint.save_reward_model(tmp_path / "merged", ckpt.cfg, merged, head, labels=["a", "b"],
                                    pad_token_id=ckpt.tokenizer.pad_token_id, copy_from=ckpt.folder)
    rm = hf_checkpoint.load_reward_model(tmp_path / "merged")
    ids, mask = _batch(ckpt.cfg.vocab_size, rm.pad_token_id, ckpt.tokenizer.eos_token_id)
    adapted = _scores(ckpt.graphdef, lora.apply_lora(ckpt.params, adapters, LCFG), head, ids, mask)
    base = _scores(ckpt.graphdef, ckpt.params, head, ids, mask)
    np.testing.assert_allclose(_scores(rm.graphdef, rm.params, rm.head, ids, mask), adapted, atol=1e-5, rtol=0)
    assert np.abs(adapted - base).max() > 0.05


def test_peft_export_task_type_errors(tmp_path):
    ckpt, adapters, head = _lora_reward_model()
    with pytest.raises(ValueError, match="task_type='SEQ_CLS' needs reward_head"):
        lora.export_peft(adapters, LCFG, ckpt.cfg, str(tmp_path), task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="task_type='TOKEN_CLS' is not one of"):
        lora.export_peft(adapters, LCFG, ckpt.cfg, str(tmp_path), task_type="TOKEN_CLS")
    with pytest.raises(ValueError, match=r"reward_head has shape \[2, 64\]"):
        lora.export_peft(adapters, LCFG, ckpt.cfg, str(tmp_path), task_type="SEQ_CLS", reward_head=head.T)


# ---------------------------------------------------------------------------
# Live: transformers (and peft) load prefjax's exports
# ---------------------------------------------------------------------------

def _transformers_scores(folder, ids, mask, **kwargs) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(folder), attn_implementation="eager", dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.logits.numpy()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("num_labels", [1, 3])
def test_live_transformers_scores_prefjax_exports(source, num_labels, tmp_path):
    pytest.importorskip("torch")
    ckpt, head, _, _ = _export_from_causal(source, tmp_path, num_labels)
    ids, mask = _batch(ckpt.cfg.vocab_size, ckpt.tokenizer.pad_token_id, ckpt.tokenizer.eos_token_id)
    want = _transformers_scores(tmp_path, ids, mask)
    got = _scores(ckpt.graphdef, ckpt.params, head, ids, mask)
    assert want.shape == (3, num_labels)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_live_peft_loads_the_seq_cls_adapter(tmp_path):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import torch

    ckpt, adapters, head = _lora_reward_model()
    lora.export_peft(adapters, LCFG, ckpt.cfg, str(tmp_path), task_type="SEQ_CLS", reward_head=head)
    pad = ckpt.tokenizer.pad_token_id
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(ckpt.folder), num_labels=2, pad_token_id=pad, attn_implementation="eager", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ids, mask = _batch(ckpt.cfg.vocab_size, pad, ckpt.tokenizer.eos_token_id)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    got = _scores(ckpt.graphdef, lora.apply_lora(ckpt.params, adapters, LCFG), head, ids, mask)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
