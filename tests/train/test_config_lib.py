"""The strict trainer config: unknown keys and loss hyperparameters with a did-you-mean, the data
pipeline's settings checked before anything compiles, the length warning against the model,
and the keys that may be None."""

from __future__ import annotations

import dataclasses

import pytest

from prefjax.models.config import PRESETS
from prefjax.train import config_lib


def _config(**changes):
    config = config_lib.trainer_config()
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        with node.ignore_type():  # e.g. data.buckets: an int by default, also "pow2" or a list
            node[leaf] = value
    return config


def test_the_default_config_is_valid():
    config_lib.validate(config_lib.trainer_config(), num_devices=1)


def test_a_misspelled_key_in_a_file_names_the_file_and_the_key_it_meant():
    config = _config()
    config.data.max_lenght = 256  # an unlocked ConfigDict silently grows a key
    config.lora.rnak = 4
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.check_keys(config, source="configs/mine.py")
    lines = str(err.value).splitlines()
    assert lines[0] == ("configs/mine.py: unknown keys data.max_lenght (did you mean data.max_len?), "
                        "lora.rnak (did you mean lora.rank?)")
    assert lines[1] == "every key, its default and meaning: configs/README.md"
    with pytest.raises(config_lib.ConfigError, match=r"^config: unknown keys data.max_lenght"):
        config_lib.validate(config, num_devices=1)


def test_a_key_with_nothing_close_gets_no_suggestion_and_whole_new_sections_are_caught():
    config = _config()
    config.wandb = {"project": "x"}
    with pytest.raises(config_lib.ConfigError, match=r"^config: unknown key wandb\n"):
        config_lib.check_keys(config)


def test_loss_hyperparameters_are_checked_against_the_chosen_loss():
    config = _config(loss_name="simpo")
    config.loss.gama = 0.5
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(config, num_devices=1)
    assert str(err.value) == ("config.loss: loss 'simpo' has no hyperparameter gama (did you mean gamma?); "
                              "its hyperparameters (paper defaults): beta=2.0, gamma=1.0, label_smoothing=0.0")
    config = _config(loss_name="simpo")
    config.loss.gamma = 0.5
    config_lib.validate(config, num_devices=1)


def test_an_unknown_loss_name_suggests_the_closest():
    with pytest.raises(config_lib.ConfigError, match=r"^loss_name='simpp' is not a registered loss \(did you mean "
                                                     r"simpo\?\); registered: .*\bdpo\b"):
        config_lib.validate(_config(loss_name="simpp"), num_devices=1)
    with pytest.raises(config_lib.ConfigError, match=r"^loss_name='zzzz' is not a registered loss; registered"):
        config_lib.validate(_config(loss_name="zzzz"), num_devices=1)


@pytest.mark.parametrize("changes, message", [
    ({"data.max_prompt_len": 64}, r"data.max_prompt_len=64 must be below data.max_len=64 .*raise data.max_len"),
    ({"data.max_prompt_len": 0}, r"data.max_prompt_len=0 must be a positive number of tokens, or None"),
    ({"data.max_response_len": 65}, r"data.max_response_len=65 must be at most data.max_len=64"),
    ({"data.max_len": 1}, r"data.max_len=1 must be an integer >= 2"),
    ({"data.prompt_mode": "keep_middle"}, r"data.prompt_mode='keep_middle' is not allowed; choose one of "
                                          r"\['keep_start', 'keep_end', 'drop'\]"),
    ({"data.response_mode": "cut"}, r"data.response_mode='cut' is not allowed"),
    ({"data.on_error": "ignore"}, r"data.on_error='ignore' is not allowed; choose one of \['error', 'skip', 'drop'\]"),
    ({"data.buckets": "pow3"}, r"data.buckets='pow3': buckets must be 'pow2', an int"),
    ({"data.buckets": 0}, r"data.buckets=0: buckets as a multiple must be >= 1"),
    ({"data.num_epochs": 0}, r"data.num_epochs=0 must be >= 1, or None"),
    ({"data.label_noise": 1.5}, r"data.label_noise=1.5 must be a fraction in \[0, 1\]"),
    ({"data.batch_size": 0}, r"data.batch_size=0 must be a positive integer"),
    ({"optimizer.name": "adamw2"}, r"optimizer: optimizer config field 'name' = 'adamw2'"),
])
def test_data_and_optimizer_settings_are_checked_before_anything_compiles(changes, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(_config(**changes), num_devices=1)


def test_truncation_limits_that_fit_are_accepted():
    config_lib.validate(_config(**{"data.max_prompt_len": 48, "data.max_response_len": 64, "data.buckets": "pow2",
                                   "data.on_error": "skip"}), num_devices=1)


def test_field_names_must_be_strings():
    config = _config(**{"data.fields.prompt": None})  # ConfigDict's type check lets None through
    with pytest.raises(config_lib.ConfigError, match=r"data.fields.prompt=None must be a column name \(a string"):
        config_lib.validate(config, num_devices=1)


def test_an_unknown_data_format_is_refused_with_the_formats_suggestion():
    pytest.importorskip("prefjax.data.formats")
    with pytest.raises(config_lib.ConfigError,
                       match=r"^data.format: unknown row format 'sharegtp' \(did you mean sharegpt\?\)"):
        config_lib.validate(_config(**{"data.format": "sharegtp"}), num_devices=1)


def test_a_mesh_that_does_not_fit_and_a_batch_that_does_not_split_are_refused():
    with pytest.raises(config_lib.ConfigError, match=r"mesh .* does not fit 1 devices"):
        config_lib.validate(_config(**{"mesh.fsdp": 2}), num_devices=1)
    with pytest.raises(config_lib.ConfigError, match=r"the micro-batch \(8 examples / grad_accum 1 = 8\) must be a "
                                                     r"multiple of the data-parallel size data\*fsdp = 3"):
        config_lib.validate(_config(), num_devices=3)


def test_a_max_len_past_the_models_context_gives_a_one_line_warning():
    model_cfg = dataclasses.replace(PRESETS["llama2-tiny"], max_position_embeddings=512)
    assert config_lib.check_length_against_model(_config(**{"data.max_len": 512}), model_cfg) is None
    warning = config_lib.check_length_against_model(_config(**{"data.max_len": 1024}), model_cfg)
    assert warning.startswith("data.max_len=1024 exceeds the model's max_position_embeddings=512")
    assert "\n" not in warning


def test_nullable_keys_are_the_placeholders_and_none_defaults():
    nullable = config_lib.nullable_keys()
    assert {"data.max_prompt_len", "data.max_response_len", "data.num_epochs", "model.attention_impl",
            "vocab_chunk", "logprob_tile_tokens", "sharding_rules"} <= nullable
    assert not {"data.max_len", "data.source", "total_steps", "loss_name"} & nullable


def test_text_data_without_a_tokenizer_is_refused():
    with pytest.raises(config_lib.ConfigError, match=r"^data.source='pairs.jsonl' is text: set model.hf_folder .* or "
                                                     r"data.tokenizer$"):
        config_lib.validate(_config(**{"data.source": "pairs.jsonl"}), num_devices=1)


def test_missing_data_files_are_named(tmp_path):
    missing = str(tmp_path / "pairs.jsonl")
    with pytest.raises(config_lib.ConfigError, match=rf"^data.source: {missing}: no such file$"):
        config_lib.check_data_files(_config(**{"data.source": missing}))
    with pytest.raises(config_lib.ConfigError, match=r"^data.eval_source: no file matches '.*\*.jsonl'$"):
        config_lib.check_data_files(_config(**{"data.eval_source": str(tmp_path / "*.jsonl")}))
    (tmp_path / "pairs.jsonl").write_text("")
    config_lib.check_data_files(_config(**{"data.source": missing, "data.eval_source": "synthetic"}))
    config_lib.check_data_files(_config(**{"data.source": "hf:owner/name", "data.eval_source": str(tmp_path)}))
