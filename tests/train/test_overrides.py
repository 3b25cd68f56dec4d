"""Command-line overrides beyond config_flags: None values, any hyperparameter of the chosen loss,
and the loss-switch rule (prefjax.train.overrides)."""

from __future__ import annotations

import pytest

from prefjax.train import config_lib, overrides

PROGRAM = "prefjax/main.py"


def _apply(config, *args, overridden=()):
    command_line = overrides.split_argv([PROGRAM, "--config=c.py", *args])
    return overrides.apply(config, command_line, overridden=overridden, nullable=config_lib.nullable_keys())


def _dpo_file_config():
    """What a config file written for DPO holds: its beta, and a frozen reference it chose."""
    config = config_lib.trainer_config()
    config.loss.beta = 0.3
    config.reference.kind = "frozen"
    config.reference.refresh = "soft"
    config.lock()
    return config


def test_split_takes_out_none_values_and_loss_settings_only():
    command_line = overrides.split_argv([PROGRAM, "--config=c.py", "--config.data.max_prompt_len=None",
                                         "--config.model.attention_impl", "None", "--config.total_steps=3",
                                         "--config.loss_name", "simpo", "--config.loss.gamma=0.5",
                                         "--noconfig.loss.scaled", "--workdir=w"])
    assert command_line.argv == [PROGRAM, "--config=c.py", "--config.total_steps=3", "--workdir=w"]
    assert command_line.nones == ("data.max_prompt_len", "model.attention_impl")
    assert command_line.loss_name == "simpo"
    assert command_line.loss_values == {"gamma": "0.5", "scaled": "false"}


def test_none_reaches_placeholder_and_optional_string_keys():
    config = config_lib.trainer_config()
    config.data.max_prompt_len = 32
    config.model.attention_impl = "flash"
    config.lock()
    assert _apply(config, "--config.data.max_prompt_len=None", "--config.model.attention_impl=None") == []
    assert config.data.max_prompt_len is None and config.model.attention_impl is None


@pytest.mark.parametrize("arg, message", [
    ("--config.data.max_len=None", r"^--config.data.max_len=None: data.max_len cannot be None \(it is 64 by "
                                   r"default; see configs/README.md\)$"),
    ("--config.data.max_prompt_lenn=None", r"^--config.data.max_prompt_lenn=None: unknown key \(did you mean "
                                           r"data.max_prompt_len\?\)$"),
    ("--config.loss.gama=0.5", r"^--config.loss: loss 'dpo' has no hyperparameter gama; its hyperparameters"),
    ("--config.loss.beta=high", r"^--config.loss.beta='high': not a float \(the paper default is 0.1\)$"),
    ("--config.loss_name=simpp", r"^--config.loss_name='simpp' is not a registered loss \(did you mean simpo\?\)"),
])
def test_bad_overrides_name_the_argument(arg, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        _apply(config_lib.trainer_config(), arg)


def test_any_hyperparameter_of_the_loss_can_be_set_typed_by_its_default():
    config = config_lib.trainer_config()
    config.loss_name = "modpo"
    config.lock()
    _apply(config, "--config.loss.beta=0.5", "--config.loss.weights=0.3,0.7")
    assert config.loss.to_dict() == {"beta": 0.5, "weights": (0.3, 0.7)}
    config_lib.validate(config, num_devices=1)


def test_switching_the_loss_takes_its_paper_defaults_and_drops_the_files_reference():
    config = _dpo_file_config()
    notes = _apply(config, "--config.loss_name=simpo", "--config.loss.gamma=0.5")
    assert config.loss_name == "simpo"
    # SimPO's beta is its paper default (2.0), not the file's DPO beta; gamma as given.
    assert config.loss.to_dict() == {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0}
    assert (config.reference.kind, config.reference.refresh) == ("auto", "none")
    assert notes[0].startswith("loss_name dpo -> simpo: config.loss = {'beta': 2.0, 'gamma': 0.5, "
                               "'label_smoothing': 0.0}") and "the file's {'beta': 0.3} dropped" in notes[0]
    assert notes[1:] == ["reference.kind 'frozen' -> 'auto' for simpo (it reads no reference)",
                         "reference.refresh 'soft' -> 'none' for simpo (it reads no reference)"]
    config_lib.validate(config, num_devices=1)


def test_reference_keys_set_on_the_command_line_are_kept_and_then_validated():
    config = _dpo_file_config()
    config.unlock()
    config.reference.kind = "precomputed"  # as config_flags would have set it from the command line
    config.reference.refresh = "none"
    notes = _apply(config, "--config.loss_name=simpo", overridden={"reference.kind": "precomputed"})
    assert config.reference.kind == "precomputed" and len(notes) == 1


def test_a_loss_that_needs_a_reference_gets_one_where_the_file_had_none():
    config = config_lib.trainer_config()
    config.loss_name = "simpo"
    config.reference.kind = "none"
    config.lock()
    notes = _apply(config, "--config.loss_name=ipo")
    assert config.reference.kind == "auto" and notes[-1] == "reference.kind 'none' -> 'auto' for ipo (it needs a reference)"
    assert config.loss.to_dict() == {"beta": 0.1}


def test_naming_the_files_own_loss_keeps_its_hyperparameters():
    config = _dpo_file_config()
    assert _apply(config, "--config.loss_name=dpo", "--config.loss.label_smoothing=0.1") == []
    assert config.loss.to_dict() == {"beta": 0.3, "label_smoothing": 0.1}
    assert config.reference.kind == "frozen"
