"""Supervised fine-tuning: a tiny decoder learns to imitate the task's noisy demonstrator.

    model, history = sft.train(task, tokenizer, model_cfg, SftConfig(steps=1500), seed=0)

The loss is the mean negative log-likelihood of the response tokens and the EOS
(prompt tokens are context only), computed with prefjax.logprobs on the model's
hidden states; the optimizer is prefjax.optim's chain (AdamW, warmup, cosine
decay, clipping). The step is one jitted function; the data are `examples`
fixed demonstrations, reshuffled every epoch, so the run is a pure function of
the seed.

The demonstrator is deliberately imperfect (see prefjax.quickstart.tasks), so
the resulting policy is right only some of the time: the starting point that
preference tuning is meant to improve.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prefjax import models, optim
from prefjax.models.config import ModelConfig
from prefjax.models.tokenizer import Tokenizer
from prefjax.quickstart import rollouts
from prefjax.quickstart.tasks import Task


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


def demonstrations(task: Task, tokenizer: Tokenizer, count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` demonstrations as rows (prompt, response, EOS), from the task's demonstrator."""
    rng = np.random.default_rng([seed, 1])
    prompts = task.prompts(rng, count)
    responses = [task.demonstration(p, rng) for p in prompts]
    eos = tokenizer.eos_token_id
    response_ids = [ids + [eos] for ids in rollouts.encode(tokenizer, responses)]
    return rollouts.build_rows(rollouts.encode(tokenizer, prompts), response_ids, rollouts.row_length(task),
                               tokenizer.pad_token_id)


def nll(params: Any, graphdef: nnx.GraphDef, rows: dict[str, jax.Array]) -> jax.Array:
    """Mean negative log-likelihood per scored token."""
    logps, mask = rollouts.token_logps(graphdef, params, rows)
    return -jnp.sum(logps) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnums=(0, 1))
def train_step(params: Any, opt_state: Any, rows: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation) -> tuple[Any, Any, jax.Array]:
    loss, grads = jax.value_and_grad(nll)(params, graphdef, rows)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train(task: Task, tokenizer: Tokenizer, cfg: ModelConfig, config: SftConfig, *, seed: int,
          echo: Optional[Callable[[str], None]] = print) -> tuple[rollouts.Model, list[dict[str, float]]]:
    """(the fine-tuned model, loss history [{"step", "loss", "seconds"}]) after config.steps steps."""
    graphdef, params = models.init_params(cfg, seed=seed)
    tx, _ = optim.make_optimizer(dict(name="adamw", learning_rate=config.learning_rate,
                                      warmup_steps=config.warmup_steps, schedule="cosine",
                                      min_learning_rate_ratio=0.1, weight_decay=config.weight_decay,
                                      grad_clip_norm=1.0), config.steps)
    opt_state = jax.jit(tx.init)(params)
    data = demonstrations(task, tokenizer, config.examples, seed)
    order = np.random.default_rng([seed, 2])
    perm, cursor = order.permutation(config.examples), 0
    history: list[dict[str, float]] = []
    pending, start = [], time.perf_counter()  # losses stay on device until logged (no per-step sync)
    for step in range(1, config.steps + 1):
        if cursor + config.batch_size > config.examples:
            perm, cursor = order.permutation(config.examples), 0
        index = perm[cursor:cursor + config.batch_size]
        cursor += config.batch_size
        params, opt_state, loss = train_step(params, opt_state, {k: v[index] for k, v in data.items()},
                                             graphdef=graphdef, tx=tx)
        pending.append(loss)
        if step % config.log_every == 0 or step == config.steps:
            mean = float(np.mean(jax.device_get(pending)))
            record = {"step": step, "loss": mean, "seconds": time.perf_counter() - start}
            history.append(record)
            pending = []
            if echo is not None:
                echo(f"  sft step {step:5d}/{config.steps}  loss {record['loss']:.4f}  "
                     f"({record['seconds']:.0f} s)")
    return rollouts.Model(cfg, graphdef, params), history
