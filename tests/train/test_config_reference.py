"""configs/README.md is generated from the code and current; every key has a meaning."""

from __future__ import annotations

from prefjax.train import config_lib, config_reference


def test_the_committed_key_reference_is_current():
    assert config_reference.OUTPUT.read_text() == config_reference.render(), (
        "configs/README.md is stale: run python -m prefjax.train.config_reference --write")


def test_every_key_is_listed_with_a_meaning():
    meanings = config_reference.descriptions()
    keys = list(config_lib.leaf_paths(config_lib.trainer_config()))
    assert sorted(meanings) == sorted(keys)
    assert [k for k in keys if not meanings[k]] == []
    text = config_reference.render()
    assert all(f"| `{k}` |" in text for k in keys)


def test_meanings_come_from_the_comment_beside_each_default():
    meanings = config_reference.descriptions()
    assert meanings["data.max_prompt_len"] == "prompt token limit; None: no limit"
    # comment lines above a key, when it has none on its line
    assert meanings["model.hf_folder"].startswith("a Hugging Face checkpoint to start from: a local folder")
    # a key with no comment of its own takes its section's
    assert meanings["data.fields.prompt"] == meanings["data.fields.chosen"] != ""
    # the optimizer's keys from optim.default_config's docstring ("b1, b2, eps: ..." names three)
    assert meanings["optimizer.b2"].startswith("Adam's moment decays") and meanings["optimizer.b2"] == meanings["optimizer.eps"]


def test_the_loss_switch_rule_and_the_losses_hyperparameters_are_in_the_reference():
    text = config_reference.render()
    assert "3. `--config.loss_name=NAME` switching to another loss" in text
    assert "| `simpo` | `beta=2.0`, `gamma=1.0`, `label_smoothing=0.0` |" in text
