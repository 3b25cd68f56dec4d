"""DPO with the sharded trainer on a tiny Llama and synthetic token data (CPU, no downloads).

    python -m prefjax.main --config=configs/tiny_dpo.py --workdir=/tmp/prefjax-tiny-dpo

20 steps of 8 random preference pairs (64 tokens) on llama2-tiny with a frozen reference
(reference.kind "auto": the frozen copy the loss needs, none for reference-free losses),
AdamW, checkpoints every 10 steps, a Hugging Face export at the end. Expected: the loss
falls from log 2 = 0.693 towards ~0.1 as the policy memorises the random pairs, reward
accuracy reaches 1.0, in about 20 s on 2 CPU cores (mostly compilation). Rerunning the
command resumes (and, once finished, only re-exports). Any loss:

    --config=configs/tiny_dpo.py:ipo         (that loss, with its paper defaults as keys)
    --config.loss_name=simpo                 (reference-free: no reference copy is held)
    --config.data.source=tests/fixtures/data/pairs_chat.jsonl --config.data.tokenizer=... 
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from prefjax.losses import registry
from prefjax.train import config_lib


def get_config(loss_name: Optional[str] = None) -> ml_collections.ConfigDict:
    config = config_lib.trainer_config()
    config.model.preset = "llama2-tiny"
    config.total_steps = 20
    config.data.batch_size = 8
    config.data.max_len = 64
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 2
    if loss_name:
        config.loss_name = loss_name
        config.loss = ml_collections.ConfigDict(registry.get(loss_name).hparam_defaults)
    return config
