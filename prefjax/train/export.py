"""The trained policy as a Hugging Face folder at the end of a run.

Full fine-tuning writes the weights (`<workdir>/hf_export`, or `checkpoint.export_dir`);
LoRA writes the merged weights there and the adapters alone as a PEFT folder
(`<workdir>/hf_adapters`). The tokenizer files come along from the starting model's
folder (or `data.tokenizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections

from prefjax.models import hf_checkpoint
from prefjax.models import lora as lora_lib
from prefjax.train.state import TrainState


def export_dir(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    return Path(config.checkpoint.export_dir) if config.checkpoint.export_dir else workdir / "hf_export"


def export_policy(config: ml_collections.ConfigDict, setup: Any, state: TrainState, workdir: Path) -> str:
    """Writes the policy of `state` (module docstring); returns the folder."""
    folder = export_dir(config, workdir)
    copy_from = config.model.hf_folder or config.data.tokenizer or None
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
    return str(folder)
