"""Reward models through the trainer: a Bradley-Terry run learns, its export is a
*ForSequenceClassification folder whose head and normalisation statistics are the run's, LoRA
reward models export merged, and an imported reward model trains further with its own head."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from prefjax import train
from prefjax.models import hf_checkpoint
from prefjax.train import config_lib
from prefjax.train.config_lib import ConfigError
from tests.train.test_loop import _config, _losses

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _reward_config(**changes):
    base = {"loss_name": "bradley_terry", "checkpoint.export_hf": True, "total_steps": 8,
            "optimizer.learning_rate": 1e-2, "reward.normalize_batches": 3}
    return _config(**{**base, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One Bradley-Terry run on two cycled synthetic batches: (config, workdir, summary)."""
    workdir = tmp_path_factory.mktemp("reward_run")
    config = _reward_config(**{"reward.normalize_batches": 2, "data.synthetic_pool": 2})
    return config, workdir, train.run(config, str(workdir))


def _exported_rewards(config, rm, batches, train_stream=False):
    """[n, K] rewards of the exported model over the first `batches` synthetic batches (the stream
    reward_stats reads, or with `train_stream` the training batches themselves)."""
    from prefjax import scoring
    from prefjax.data import streams

    source = streams.make_stream(config, "synthetic", kind="pair", vocab_size=rm.cfg.vocab_size, tokenizer=None,
                                 train=train_stream)
    model = scoring.Model(rm.cfg, rm.graphdef)
    values = []
    for i, batch in enumerate(source):
        if i == batches:
            break
        out = scoring.score(model, rm.params, batch.map(np.asarray), what=("rewards",), reward_head=rm.head)
        values.append(np.asarray(out.rewards)[..., 0])
    return np.concatenate(values).astype(np.float64)


def test_a_bradley_terry_run_learns_and_exports_a_sequence_classification_folder(trained):
    config, workdir, summary = trained
    losses = _losses(workdir)
    # a fresh N(0, 1/(D+1)) head: responses differ from step 1, so the first loss is not exactly log 2
    assert abs(losses[1] - np.log(2.0)) > 1e-4
    assert losses[8] < losses[1] / 4  # two cycled batches: the run fits them
    assert summary["final/rewards/accuracies"] == 1.0
    folder = Path(summary["exported"])
    exported = json.loads((folder / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForSequenceClassification"]
    assert exported["num_labels"] == 1 and exported["id2label"] == {"0": "reward"}
    rm = hf_checkpoint.load_reward_model(folder, with_tokenizer=False)
    assert rm.head.shape == (rm.cfg.hidden_size, 1) and "lm_head" not in rm.params
    # the exported model is the trained one: it orders the training pairs as the run ended doing
    rewards = _exported_rewards(config, rm, 2, train_stream=True)
    assert (rewards[:, 0] > rewards[:, 1]).all()


def test_normalisation_statistics_are_the_exported_models_rewards_over_the_data(trained):
    config, _, summary = trained
    rm = hf_checkpoint.load_reward_model(summary["exported"], with_tokenizer=False)
    values = _exported_rewards(config, rm, 2).reshape(-1)
    assert values.size == 2 * 8 * 2  # batches x examples x responses: every real response once
    norm = json.loads((Path(summary["exported"]) / "config.json").read_text())["prefjax_reward_normalization"]
    assert rm.normalization == norm
    np.testing.assert_allclose(norm["mean"][0], values.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norm["std"][0], values.std(), rtol=1e-4, atol=1e-5)


def test_a_lora_reward_model_exports_its_merged_weights(tmp_path):
    from prefjax import models

    config = _reward_config(total_steps=3, **{"lora.enabled": True, "lora.rank": 4})
    summary = train.run(config, str(tmp_path))
    rm = hf_checkpoint.load_reward_model(summary["exported"], with_tokenizer=False)
    assert rm.head.shape[1] == 1 and "lm_head" not in rm.params
    _, base = models.init_params(models.get_preset("llama2-tiny"), seed=config.seed)
    q_base, q_out = np.asarray(base["layers"][0]["attn"]["q"]), np.asarray(rm.params["layers"][0]["attn"]["q"])
    assert q_out.shape == q_base.shape and not np.allclose(q_out, q_base)  # adapters merged in
    np.testing.assert_array_equal(np.asarray(rm.params["embedding"]), np.asarray(base["embedding"]))  # no adapter
    peft = json.loads((tmp_path / "hf_adapters" / "adapter_config.json").read_text())
    assert peft["task_type"] == "SEQ_CLS" and peft["modules_to_save"] == ["score"]


def test_a_multi_attribute_regression_model_learns_its_ratings_and_exports_named_outputs(tmp_path):
    labels = ("helpfulness", "correctness", "verbosity")
    config = _reward_config(**{"loss_name": "rating_regression", "reward.num_labels": 3, "reward.labels": labels,
                               "data.synthetic_pool": 1, "total_steps": 6})
    summary = train.run(config, str(tmp_path))
    losses = _losses(tmp_path)
    assert losses[6] < losses[1] / 2  # one cycled batch of rated responses: the ratings are fitted
    exported = json.loads((Path(summary["exported"]) / "config.json").read_text())
    assert exported["num_labels"] == 3 and exported["id2label"] == {str(i): n for i, n in enumerate(labels)}
    assert len(exported["prefjax_reward_normalization"]["mean"]) == 3
    rm = hf_checkpoint.load_reward_model(summary["exported"], with_tokenizer=False)
    assert rm.head.shape == (rm.cfg.hidden_size, 3) and rm.labels == labels


def test_reward_config_errors_name_the_keys():
    for changes, words in [
        ({"reward.num_labels": 2}, "set reward.num_labels=1"),
        ({"loss_name": "rating_regression", "reward.num_labels": 2, "reward.labels": ("a",)},
         "reward.labels has 1 name(s) ['a'] but reward.num_labels=2"),
        ({"reward.num_labels": 0}, "reward.num_labels=0 must be a positive integer"),
        ({"loss_name": "rating_regression", "reward.num_labels": 2, "data.label_noise": 0.2},
         "rated data (reward.num_labels=2) has ratings, not preferences: set data.label_noise=0"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            config_lib.validate(_reward_config(**changes), num_devices=1)


def test_a_pad_id_that_is_an_eos_id_fails_at_start_up_not_at_export(tmp_path):
    folder = FIXTURES / "hf" / "qwen2"
    eos = json.loads((folder / "config.json").read_text())["eos_token_id"]
    config = _reward_config(**{"model.hf_folder": str(folder), "reward.pad_token_id": eos,
                               "data.source": str(FIXTURES / "data" / "trl_ultrafeedback.jsonl"),
                               "data.max_len": 64})
    with pytest.raises(hf_checkpoint.PadTokenError, match=f"pad_token_id={eos} is also an EOS id") as err:
        train.run(config, str(tmp_path))
    assert "reward.pad_token_id sets its pad id" in str(err.value)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing trained


def test_a_tokenizer_without_eos_is_refused_before_training(tmp_path):
    import shutil

    folder = tmp_path / "no_eos"
    shutil.copytree(FIXTURES / "hf" / "qwen2", folder)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.pop("eos_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    config = _reward_config(**{"model.hf_folder": str(folder), "data.max_len": 64,
                               "data.source": str(FIXTURES / "data" / "trl_ultrafeedback.jsonl")})
    with pytest.raises(ConfigError, match="has no EOS token: a reward model reads each response's reward at its"):
        train.run(config, str(tmp_path / "run"))


def test_a_policy_loss_refuses_a_reward_model_folder(tmp_path):
    folder = FIXTURES / "hf_reward" / "llama"
    if not folder.is_dir():
        pytest.skip("reward fixtures not built")
    config = _config(**{"model.hf_folder": str(folder)})
    with pytest.raises(ConfigError, match="is a reward model"):
        train.run(config, str(tmp_path))


def test_an_imported_reward_model_trains_on_with_its_own_head(tmp_path):
    folder = FIXTURES / "hf_reward" / "llama"
    if not folder.is_dir():
        pytest.skip("reward fixtures not built")
    rm = hf_checkpoint.load_reward_model(folder)
    summary = train.run(_reward_config(total_steps=1, **{"model.hf_folder": str(folder),
                                                         "optimizer.learning_rate": 1e-9}), str(tmp_path))
    out = hf_checkpoint.load_reward_model(summary["exported"])
    # one step at a negligible learning rate: the exported head is the imported one, not a fresh draw
    np.testing.assert_allclose(np.asarray(out.head), np.asarray(rm.head), atol=1e-6)
    assert jax.tree.structure(out.params) == jax.tree.structure(rm.params)


def _config_module():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "configs" / "reward_model.py"
    spec = importlib.util.spec_from_file_location("reward_model_config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["test", "helpsteer2:test"])
def test_the_reward_model_configs_train_on_the_fixtures_and_export(variant, tmp_path):
    module = _config_module()
    for real in ("", "helpsteer2"):
        config_lib.validate(module.get_config(real), num_devices=8)  # the real ones validate (no download)
    with pytest.raises(ValueError, match="takes one of \\['bradley_terry', 'helpsteer2'\\]"):
        module.get_config("helpstear2")
    config = module.get_config(variant)
    summary = train.run(config, str(tmp_path))
    exported = json.loads((Path(summary["exported"]) / "config.json").read_text())
    assert exported["architectures"] == ["Qwen2ForSequenceClassification"]
    labels = ["reward"] if variant == "test" else list(module.HELPSTEER2_ATTRIBUTES)
    assert [exported["id2label"][str(i)] for i in range(len(labels))] == labels
    assert exported["pad_token_id"] not in (exported.get("eos_token_id"), None)
    rm = hf_checkpoint.load_reward_model(summary["exported"])
    assert rm.tokenizer is not None and rm.head.shape[1] == len(labels)
