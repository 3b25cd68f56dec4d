"""A tiny policy for the quick start's arithmetic task, and online configs around it (tests only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import ml_collections

from prefjax import models
from prefjax.models import hf_checkpoint
from prefjax.quickstart import sft, vocab
from prefjax.quickstart.tasks import get_task

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "online.py"


def task_model(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer, 32-wide Llama with the arithmetic task's tokenizer, saved as a
    Hugging Face folder."""
    if (folder / "config.json").is_file():
        return folder
    task = get_task("arithmetic")
    tokenizer = vocab.build(task, folder / "tokenizer")
    cfg = sft.model_config(tokenizer, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                           intermediate_size=64, max_len=64)
    _, params = models.init_params(cfg, seed=seed)
    hf_checkpoint.save(folder, cfg, params, copy_from=folder / "tokenizer")
    return folder


def online_config(folder: Path, algorithm: str = "online_dpo", **updates: Any) -> ml_collections.ConfigDict:
    """configs/online.py:<algorithm>,test on the tiny model, with dotted-key `updates`
    (e.g. {"online.samples_per_prompt": 4})."""
    spec = importlib.util.spec_from_file_location("online_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"{algorithm},test")
    config.model.hf_folder = str(folder)
    config.checkpoint.async_save = False
    config.workdir_lock.enabled = False
    config.update_from_flattened_dict(updates)
    return config
