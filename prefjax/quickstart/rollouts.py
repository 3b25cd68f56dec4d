"""Sampling responses and scoring sequences with prefjax.sampling and prefjax.scoring.

    model = rollouts.Model(cfg, graphdef, params)                 # or rollouts.load(hf_folder)
    batch = rollouts.sample(model, tokenizer, task, prompts, seed=0)
    batch.texts, batch.rewards(task), batch.logps                 # decoded responses, ...
    logps = rollouts.sequence_logps(reference, batch)             # the same responses under another model

Layout (the same as prefjax.data's plain-text rows, so supervised fine-tuning,
sampling and the preference trainer see identical token sequences): a row is the
prompt's tokens, then the response's tokens, then EOS; no BOS; padding after.
The response tokens and the EOS are scored; the prompt is not.

Shapes are fixed per task (prompts padded to `task.max_prompt_tokens`, responses
to `task.max_response_tokens`, rows processed `batch_size` at a time), so each
model compiles the sampler and the scorer once.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx

from prefjax import sampling, scoring
from prefjax.batch import Batch
from prefjax.models import hf_checkpoint
from prefjax.models.config import ModelConfig
from prefjax.models.tokenizer import Tokenizer
from prefjax.quickstart import vocab
from prefjax.quickstart.tasks import Task

DEFAULT_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Model:
    """A model to sample from or score with: architecture, module structure, parameters."""

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: dict

    @property
    def scorer(self) -> scoring.Model:
        """What prefjax.scoring.score needs besides the params."""
        return scoring.Model(self.cfg, self.graphdef)


def load(folder: str | Path) -> Model:
    """The model of a Hugging Face folder (e.g. the SFT checkpoint or the trainer's hf_export)."""
    ckpt = hf_checkpoint.load(folder, with_tokenizer=False)
    return Model(ckpt.cfg, ckpt.graphdef, ckpt.params)


def encode(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    return tokenizer.encode_batch(list(texts), add_special_tokens=False)


@functools.partial(jax.jit, static_argnames=("model",))
def _sequence_logps(params: dict, batch: Batch, *, model: scoring.Model) -> jax.Array:
    return scoring.score(model, params, batch).logps[:, 0]


@dataclasses.dataclass
class Responses:
    """Responses to prompts (one row per response) with what scoring and datasets need.

    Attributes:
      prompts: prompt text per row; prompt_ids: their token ids.
      response_ids: the response's tokens per row, EOS included when it was emitted.
      texts: decoded responses (special tokens dropped).
      complete: ended with EOS, non-empty, and made only of task symbols, i.e. it round-trips
        through text exactly (only complete responses go into preference datasets).
      logps: the sampling model's own log-prob of each response (untempered), [B] float32.
    """

    prompts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    complete: np.ndarray
    logps: np.ndarray

    def rewards(self, task: Task) -> np.ndarray:
        return task.rewards(self.prompts, self.texts)

    def __len__(self) -> int:
        return len(self.prompts)


def _is_complete(ids: Sequence[int], eos_id: int, num_tokens: int) -> bool:
    first_symbol = len(vocab.SPECIALS)
    return (len(ids) >= 2 and ids[-1] == eos_id
            and all(first_symbol <= t < num_tokens for t in ids[:-1]))


def sample(model: Model, tokenizer: Tokenizer, task: Task, prompts: Sequence[str], *, seed: int,
           temperature: float = 1.0, batch_size: int = DEFAULT_BATCH) -> Responses:
    """One sampled response per prompt (repeat prompts for several), with prefjax.sampling.generate."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = encode(tokenizer, prompts)
    width = task.max_prompt_tokens
    too_long = [p for p, ids in zip(prompts, prompt_ids) if len(ids) > width]
    if too_long:
        raise ValueError(f"prompt {too_long[0]!r} has more than max_prompt_tokens={width} tokens")
    responses: list[list[int]] = []
    logps = []
    key = jax.random.key(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed shapes: one compilation
        ids = np.full((batch_size, width), pad, np.int32)
        for i, p in enumerate(padded):
            ids[i, :len(p)] = p
        lengths = np.asarray([len(p) for p in padded], np.int32)
        out = sampling.generate(model.graphdef, model.params, model.cfg, ids, lengths,
                                max_new_tokens=task.max_response_tokens, rng=jax.random.fold_in(key, start),
                                temperature=temperature, stop_tokens=(eos,), pad_id=pad)
        tokens, n, lp = jax.device_get((out.tokens_BxN, out.lengths_B, out.logps_BxN))
        for i in range(len(chunk)):
            responses.append([int(t) for t in tokens[i, :n[i]]])
            logps.append(float(lp[i].sum()))
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    complete = np.asarray([_is_complete(r, eos, tokenizer.vocab_size) for r in responses], bool)
    return Responses(list(prompts), prompt_ids, responses, texts, complete, np.asarray(logps, np.float32))


def from_texts(tokenizer: Tokenizer, prompts: Sequence[str], texts: Sequence[str]) -> Responses:
    """Responses given as text (e.g. a dataset's chosen answers), each closed with EOS."""
    eos = tokenizer.eos_token_id
    response_ids = [ids + [eos] for ids in encode(tokenizer, texts)]
    return Responses(list(prompts), encode(tokenizer, prompts), response_ids, list(texts),
                     np.ones(len(texts), bool), np.full(len(texts), np.nan, np.float32))


def sequence_logps(model: Model, responses: Responses, *, pad_id: int, length: Optional[int] = None,
                   batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """log model(response | prompt) summed over the response tokens (EOS included), [B] float32."""
    length = length or max(len(p) + len(r) for p, r in zip(responses.prompt_ids, responses.response_ids))
    out = []
    for start in range(0, len(responses), batch_size):
        p = responses.prompt_ids[start:start + batch_size]
        r = responses.response_ids[start:start + batch_size]
        count = len(p)
        p, r = p + [p[-1]] * (batch_size - count), r + [r[-1]] * (batch_size - count)
        values = _sequence_logps(model.params, Batch.from_sequences(p, r, length, pad_id), model=model.scorer)
        out.append(np.asarray(jax.device_get(values))[:count])
    return np.concatenate(out).astype(np.float32)


def row_length(task: Task) -> int:
    """The row length that fits any prompt and any sampled response of the task."""
    return task.max_prompt_tokens + task.max_response_tokens
