"""Supervised fine-tuning: a tiny decoder learns to imitate the task's noisy demonstrator.

    model_folder = sft.fine_tune(task, model_cfg, SftConfig(steps=1500), seed=0, folder=workdir / "sft",
                                 tokenizer_folder=workdir / "tokenizer")

SFT runs through the preference trainer (prefjax.train) with the registry's `sft` loss
(the per-token negative log-likelihood of each response; prompt tokens are context
only), like every other stage that trains. This module only prepares its inputs:

- `demonstrations.jsonl`: `examples` fixed demonstrations from the task's demonstrator,
  as unpaired rows (prompt, completion, label true) that prefjax.data reads; the
  trainer's pipeline reshuffles them every epoch;
- `init/`: the randomly initialised model (seeded) as a Hugging Face folder with the
  task's tokenizer, which the trainer starts from.

The trainer writes `metrics.jsonl` and its checkpoints into the SFT folder and exports
the fine-tuned model to `model/`; rerunning a killed stage resumes from its last
checkpoint. The optimizer is prefjax.train.optim's chain (AdamW, warmup, cosine decay to
a tenth, clipping), and the run is a pure function of the seed.

The demonstrator is deliberately imperfect (see prefjax.quickstart.tasks), so the
resulting policy is right only some of the time: the starting point that preference
tuning is meant to improve.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from prefjax import models, train
from prefjax.models import hf_checkpoint
from prefjax.models.config import ModelConfig
from prefjax.models.tokenizer import Tokenizer
from prefjax.quickstart import rollouts
from prefjax.quickstart.tasks import Task
from prefjax.train import config_lib

DEMONSTRATIONS = "demonstrations.jsonl"


class Preempted(RuntimeError):
    """The SFT run was preempted; rerunning the command resumes it from its checkpoint."""


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """steps x batch_size demonstrations seen; `examples` distinct ones (reshuffled each epoch)."""

    steps: int = 1500
    batch_size: int = 64
    examples: int = 20_000
    learning_rate: float = 3e-3
    warmup_steps: float = 0.05
    weight_decay: float = 0.01
    log_every: int = 100

    def __post_init__(self) -> None:
        for field in ("steps", "batch_size", "examples", "log_every"):
            if getattr(self, field) < 1:
                raise ValueError(f"sft.{field} must be >= 1, got {getattr(self, field)}")
        if self.learning_rate <= 0:
            raise ValueError(f"sft.learning_rate must be > 0, got {self.learning_rate}")


def model_config(tokenizer: Tokenizer, *, hidden_size: int, num_layers: int, num_heads: int, head_dim: int,
                 intermediate_size: int, max_len: int) -> ModelConfig:
    """A small Llama-family decoder sized for the task (vocabulary rounded up to a multiple of 8)."""
    vocab_size = -(-tokenizer.vocab_size // 8) * 8
    return ModelConfig(family="llama", vocab_size=vocab_size, hidden_size=hidden_size,
                       intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
                       num_kv_heads=num_heads, head_dim=head_dim, norm_eps=1e-5,
                       max_position_embeddings=max(max_len, 64))


def write_demonstrations(task: Task, count: int, seed: int, path: Path) -> Path:
    """`count` demonstrations as unpaired JSONL rows (prompt, completion, label true)."""
    rng = np.random.default_rng([seed, 1])
    prompts = task.prompts(rng, count)
    rows = [{"prompt": p, "completion": task.demonstration(p, rng), "label": True} for p in prompts]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def trainer_config(config: SftConfig, *, init_folder: Path, data: Path, export_to: Path, max_len: int,
                   seed: int) -> Any:
    """The trainer's config for the SFT stage: the `sft` loss, no reference, one final checkpoint."""
    c = config_lib.trainer_config()
    c.seed = seed
    c.model.hf_folder = str(init_folder)
    c.loss_name = "sft"
    c.data.source = str(data)
    c.data.batch_size = config.batch_size
    c.data.max_len = max_len
    c.total_steps = config.steps
    c.optimizer.update(name="adamw", learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                       schedule="cosine", min_learning_rate_ratio=0.1, weight_decay=config.weight_decay,
                       grad_clip_norm=1.0)
    c.log_every = config.log_every
    c.checkpoint.every = config.steps  # one checkpoint at the end: the run is short
    c.checkpoint.keep = 1
    c.checkpoint.export_dir = str(export_to)
    return c


def fine_tune(task: Task, cfg: ModelConfig, config: SftConfig, *, seed: int, folder: Path,
              tokenizer_folder: Path) -> Path:
    """Fine-tunes a fresh `cfg` model on the demonstrator under `folder`; returns the exported model's
    folder (`folder/model`). Raises Preempted when the run was stopped by SIGTERM."""
    folder = Path(folder)
    data = folder / DEMONSTRATIONS
    if not data.is_file():
        write_demonstrations(task, config.examples, seed, data)
    init = folder / "init"
    if not (init / "config.json").is_file():
        _, params = models.init_params(cfg, seed=seed)
        hf_checkpoint.save(init, cfg, params, copy_from=tokenizer_folder)
    c = trainer_config(config, init_folder=init, data=data, export_to=folder / "model",
                       max_len=rollouts.row_length(task), seed=seed)
    summary = train.run(c, str(folder))
    if summary.get("preempted"):
        raise Preempted(f"supervised fine-tuning stopped at step {summary['step']}; rerun the same command to "
                        "resume it")
    return Path(summary["exported"])
