"""The trained policy as a Hugging Face folder at the end of a run.

Full fine-tuning writes the weights (`<workdir>/hf_export`, or `checkpoint.export_dir`);
LoRA writes the merged weights there and the adapters alone as a PEFT folder
(`<workdir>/hf_adapters`). The tokenizer files come along from the starting model's
folder (or `data.tokenizer`). Next to config.json, `prefjax_training.json` records how the
weights were trained: the sequence length (data.max_len; config.json's
max_position_embeddings stays the base model's, which is what the architecture supports),
the loss and the starting model.

A reward model (a run with a reward-model loss) is written as the family's
`*ForSequenceClassification` folder instead (prefjax.models.hf_checkpoint.save_reward_model):
the decoder without its LM head, the head as `score.weight`, the output names as id2label,
the pad id, and the normalisation statistics of prefjax.train.reward_stats when measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jax
import ml_collections

from prefjax.models import hf_checkpoint, hub
from prefjax.models import lora as lora_lib
from prefjax.train import config_lib
from prefjax.train.state import TrainState

TRAINING_FILE = "prefjax_training.json"


def training_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What prefjax_training.json holds (module docstring)."""
    return {"max_len": config.data.max_len, "loss_name": config.loss_name,
            "base_model": config.model.hf_folder or config.model.preset}


def export_dir(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    return Path(config.checkpoint.export_dir) if config.checkpoint.export_dir else workdir / "hf_export"


def _companion_folder(config: ml_collections.ConfigDict) -> Optional[str]:
    """model.hf_folder or data.tokenizer (a folder or a Hub id, prefjax.models.hub): the export copies
    its tokenizer files and token ids."""
    if config.model.hf_folder:
        return hub.local_folder(config.model.hf_folder, key="model.hf_folder")
    if config.data.tokenizer:
        return hub.local_folder(config.data.tokenizer, key="data.tokenizer", weights=False)
    return None


def reward_pad_id(config: ml_collections.ConfigDict, setup: Any, data_pad_id: int, workdir: Path) -> int:
    """The pad id a reward model's export records: reward.pad_token_id, else the tokenizer's pad
    token (a preset without a tokenizer: the data's pad id). Checked at start-up, so a run cannot
    train for hours and then fail to export: it must exist and not be an EOS id."""
    pad = config.reward.pad_token_id
    if pad is None:
        pad = setup.tokenizer.pad_token_id if setup.tokenizer is not None else data_pad_id
    where = f"{export_dir(config, workdir)} (the reward model's export; reward.pad_token_id sets its pad id)"
    hf_checkpoint.check_reward_pad_id(pad, setup.model_cfg, _companion_folder(config), where)
    return int(pad)


def export_policy(config: ml_collections.ConfigDict, setup: Any, state: TrainState, workdir: Path, *,
                  pad_id: int = 0, reward_normalization: Optional[dict[str, Any]] = None) -> str:
    """Writes the policy of `state` (module docstring); returns the folder. `pad_id`: a reward
    model's pad id (`reward_pad_id`); `reward_normalization` comes from prefjax.train.reward_stats."""
    folder = export_dir(config, workdir)
    copy_from = _companion_folder(config)
    dtype = config.checkpoint.export_dtype or None
    lora = setup.spec.policy.lora
    if setup.spec.policy.reward_head:
        params = state.params["model"] if lora is None else lora_lib.merge(setup.fixed.base, state.params["adapters"],
                                                                           lora)
        head = state.params["reward_head"]
        hf_checkpoint.save_reward_model(folder, setup.model_cfg, params, head,
                                        labels=setup.reward_labels or config_lib.reward_labels(config),
                                        pad_token_id=pad_id, normalization=reward_normalization,
                                        copy_from=copy_from, dtype=dtype)
        if lora is not None and jax.process_index() == 0:  # the adapters and head alone, as a PEFT SEQ_CLS folder
            lora_lib.export_peft(jax.device_get(state.params["adapters"]), lora, setup.model_cfg,
                                 str(workdir / "hf_adapters"),
                                 base_model_name_or_path=config.model.hf_folder or config.model.preset,
                                 task_type="SEQ_CLS", reward_head=jax.device_get(head))
    elif lora is not None:
        merged = lora_lib.merge(setup.fixed.base, state.params["adapters"], lora)
        hf_checkpoint.save(folder, setup.model_cfg, merged, copy_from=copy_from, dtype=dtype)
        if jax.process_index() == 0:
            lora_lib.export_peft(jax.device_get(state.params["adapters"]), lora, setup.model_cfg,
                                 str(workdir / "hf_adapters"),
                                 base_model_name_or_path=config.model.hf_folder or config.model.preset)
    else:
        hf_checkpoint.save(folder, setup.model_cfg, state.params["model"], copy_from=copy_from, dtype=dtype)
    if jax.process_index() == 0:
        (folder / TRAINING_FILE).write_text(json.dumps(training_record(config), indent=2) + "\n")
    return str(folder)
