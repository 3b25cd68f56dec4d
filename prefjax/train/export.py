"""The trained policy as a Hugging Face folder at the end of a run.

Full fine-tuning writes the weights (`<workdir>/hf_export`, or `checkpoint.export_dir`);
LoRA writes the merged weights there and the adapters alone as a PEFT folder
(`<workdir>/hf_adapters`). The tokenizer files come along from the starting model's
folder (or `data.tokenizer`). Next to config.json, `prefjax_training.json` records how the
weights were trained: the sequence length (data.max_len; config.json's
max_position_embeddings stays the base model's, which is what the architecture supports),
the loss and the starting model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections

from prefjax.models import hf_checkpoint, hub
from prefjax.models import lora as lora_lib
from prefjax.train.state import TrainState


TRAINING_FILE = "prefjax_training.json"


def training_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What prefjax_training.json holds (module docstring)."""
    return {"max_len": config.data.max_len, "loss_name": config.loss_name,
            "base_model": config.model.hf_folder or config.model.preset}


def export_dir(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    return Path(config.checkpoint.export_dir) if config.checkpoint.export_dir else workdir / "hf_export"


def export_policy(config: ml_collections.ConfigDict, setup: Any, state: TrainState, workdir: Path) -> str:
    """Writes the policy of `state` (module docstring); returns the folder."""
    folder = export_dir(config, workdir)
    copy_from = None  # model.hf_folder or data.tokenizer, either one a folder or a Hub id (prefjax.models.hub)
    if config.model.hf_folder:
        copy_from = hub.local_folder(config.model.hf_folder, key="model.hf_folder")
    elif config.data.tokenizer:
        copy_from = hub.local_folder(config.data.tokenizer, key="data.tokenizer", weights=False)
    dtype = config.checkpoint.export_dtype or None
    lora = setup.spec.policy.lora
    if lora is not None:
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
