"""Rewards of prompt + response pairs: text or message lists, or pre-tokenized rows.

    rewards = score(rm, ["2+2?"], ["4"])                           # [1, L] float32
    rewards = score(rm, [[{"role": "user", "content": "Hi"}]],
                    [[{"role": "assistant", "content": "Hello!"}]], mesh=mesh, normalize=True)
    rewards = score_ids(rm, input_ids, attention_mask)            # HF style, left or right padded
    per_example = score_examples(rm, examples)                     # canonical examples -> [K, L] each

Text becomes tokens exactly as the trainer renders a preference example's response
(prefjax.data.tokenize with the model's RenderOptions): plain text is prompt + response + EOS,
message lists go through the chat template. So a reward model is scored on what it was
trained on, and the reward is read at the same token (the response's EOS / end-of-turn).

Sequences are scored in length buckets (prefjax.reward.batching) by the model's jitted
program (prefjax.reward.model); results come back in input order. A sequence longer than the
model's context (or `max_len`) is a ContextLengthError naming it; there is no truncation, which
would silently score a different text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from prefjax import sharding as sharding_lib
from prefjax.data.records import Location, parse_row
from prefjax.data.tokenize import response_fields, tokenize_example
from prefjax.reward import batching
from prefjax.reward.model import ImplicitRewardModel, NoNormalizationError, RewardModel

AnyRewardModel = RewardModel | ImplicitRewardModel
Conversation = str | Sequence[Mapping[str, Any]]
DEFAULT_BATCH_SIZE = 32
INPUT = "score() input"  # the "file" of examples made from score()'s arguments


class ScoreInputError(ValueError):
    """Arguments that cannot be scored (mismatched lengths, bad masks, a missing mask)."""


class ContextLengthError(ScoreInputError):
    """A prompt + response longer than the reward model's context."""


@dataclasses.dataclass(frozen=True)
class ScoredSequence:
    """One tokenized prompt + response: ids and the mask of its scored (response) tokens, and
    where it came from for messages ("prefs.jsonl:3: prompt + chosen")."""

    ids: np.ndarray
    mask: np.ndarray
    where: str


def score(model: AnyRewardModel, prompts: Sequence[Conversation], responses: Sequence[Conversation], *,
          batch_size: int = DEFAULT_BATCH_SIZE, max_len: int | None = None, normalize: bool = False,
          mesh: Mesh | None = None) -> np.ndarray:
    """Rewards [N, L] float32 of each prompts[i] + responses[i] (text, or lists of messages).

    Plain text gets the trainer's rendering (EOS appended); message lists the chat template. A
    prompt may be "" only with message-list responses. `normalize` applies the model's stored
    (mean, std); `mesh` splits the rows over its data axes (default: the mesh the model was
    loaded on). Every process of a multi-host run passes the same inputs and gets all rewards.
    """
    if isinstance(prompts, (str, bytes)) or isinstance(responses, (str, bytes)):
        raise ScoreInputError("score: prompts and responses must be sequences (lists) of texts or message lists, "
                              "not one string: wrap a single pair as score(model, [prompt], [response])")
    if len(prompts) != len(responses):
        raise ScoreInputError(f"score: {len(prompts)} prompts but {len(responses)} responses; give one prompt "
                              "per response (repeat a prompt to score several responses to it)")
    examples = [parse_row({"prompt": p, "completion": r, "label": True}, "unpaired", Location(INPUT, i, "index"))
                for i, (p, r) in enumerate(zip(prompts, responses))]
    per_example = score_examples(model, examples, batch_size=batch_size, max_len=max_len, normalize=normalize,
                                 mesh=mesh)
    if not per_example:
        return np.zeros((0, model.num_labels), np.float32)
    return np.concatenate(per_example, axis=0)


def score_examples(model: AnyRewardModel, examples: Sequence[Mapping[str, Any]], *,
                   batch_size: int = DEFAULT_BATCH_SIZE, max_len: int | None = None, normalize: bool = False,
                   mesh: Mesh | None = None) -> list[np.ndarray]:
    """Rewards of canonical examples (prefjax.data.records): one [K, L] array per example, its
    responses in the example's order (pairs: chosen, rejected)."""
    sequences, counts = [], []
    for example in examples:
        tokenized = tokenize_example(example, model.tokenizer, model.render)
        names = [name for name, _ in response_fields(example)]
        for k, name in enumerate(names):
            ids, mask = tokenized.sequence(k)
            sequences.append(ScoredSequence(ids, mask, f"{example.get('source', '?')}: prompt + {name}"))
        counts.append(len(names))
    rewards = score_sequences(model, sequences, batch_size=batch_size, max_len=max_len, normalize=normalize,
                              mesh=mesh)
    return np.split(rewards, np.cumsum(counts)[:-1]) if counts else []


def score_ids(model: AnyRewardModel, input_ids: Any, attention_mask: Any, *, response_mask: Any = None,
              batch_size: int = DEFAULT_BATCH_SIZE, max_len: int | None = None, normalize: bool = False,
              mesh: Mesh | None = None) -> np.ndarray:
    """Rewards [N, L] of pre-tokenized rows [N, T], left- or right-padded (Hugging Face style).

    An explicit reward is read at each row's last token whose attention mask is 1. The implicit
    reward sums log-ratios over `response_mask` [N, T] (1 on the response's tokens, e.g.
    labels != -100), which it needs since the ids alone do not say where the prompt ends.
    """
    ids, attention = np.asarray(input_ids), np.asarray(attention_mask)
    if ids.ndim != 2 or attention.shape != ids.shape:
        raise ScoreInputError(f"score_ids: input_ids {list(ids.shape)} and attention_mask {list(attention.shape)} "
                              "must both be [N, T]")
    if isinstance(model, ImplicitRewardModel) and response_mask is None:
        raise ScoreInputError("score_ids: the implicit reward sums log-ratios over the response tokens; pass "
                              "response_mask= [N, T] (1 on response tokens), or use score() with prompts and "
                              "responses")
    scored = np.ones_like(attention) if response_mask is None else np.asarray(response_mask)
    if scored.shape != ids.shape:
        raise ScoreInputError(f"score_ids: response_mask {list(scored.shape)} must match input_ids {list(ids.shape)}")
    sequences = []
    for i in range(ids.shape[0]):
        real = np.flatnonzero(attention[i] != 0)
        if real.size == 0:
            raise ScoreInputError(f"score_ids: row {i} has no token with attention_mask 1")
        first, last = real[0], real[-1]
        if real.size != last - first + 1:
            raise ScoreInputError(f"score_ids: row {i}'s attention_mask has holes (zeros between positions "
                                  f"{first} and {last}); only left or right padding is supported")
        mask = (scored[i, first:last + 1] != 0).astype(np.float32)
        if isinstance(model, RewardModel):
            mask[-1] = 1.0  # the reward is read at the last real token, whatever the response mask says
        elif not mask.any():
            raise ScoreInputError(f"score_ids: row {i}'s response_mask has no 1 inside its attention mask")
        sequences.append(ScoredSequence(ids[i, first:last + 1].astype(np.int32), mask, f"input_ids row {i}"))
    return score_sequences(model, sequences, batch_size=batch_size, max_len=max_len, normalize=normalize, mesh=mesh)


def score_sequences(model: AnyRewardModel, sequences: Sequence[ScoredSequence], *, batch_size: int = DEFAULT_BATCH_SIZE,
                    max_len: int | None = None, normalize: bool = False,
                    mesh: Mesh | None = None) -> np.ndarray:
    """Rewards [N, L] float32 of tokenized sequences, in their order (see the module docstring)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ScoreInputError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    stats = _normalization(model) if normalize else None
    limit = model.context if max_len is None else int(max_len)
    for seq in sequences:
        if len(seq.ids) > limit:
            raise ContextLengthError(
                f"{seq.where} is {len(seq.ids)} tokens, longer than the limit of {limit} "
                f"({'max_len' if max_len is not None else f'the context of {model.name}'}); shorten or drop it, "
                "or raise max_len (--max-len) if the model handles longer inputs")
    out = np.zeros((len(sequences), model.num_labels), np.float32)
    if not sequences:
        return out
    mesh = model.mesh if mesh is None else mesh
    program, arrays = model.program(mesh)
    chunks = batching.plan([len(s.ids) for s in sequences], batching.bucket_lengths(limit), batch_size,
                           batching.batch_multiple(mesh))
    pairs = [(s.ids, s.mask) for s in sequences]
    for chunk in chunks:
        batch = batching.place(batching.rows(pairs, chunk, model.pad_id), mesh)
        if mesh is None:
            values = program(arrays, batch)
        else:
            with sharding_lib.use_mesh(mesh):  # the model's activation constraints read the mesh
                values = program(arrays, batch)
        out[list(chunk.indices)] = _host(values)[:len(chunk.indices)]
    if stats is not None:
        mean, std = stats
        out = ((out - mean) / std).astype(np.float32)
    return out


def _host(values: jax.Array) -> np.ndarray:
    """A program's replicated output as numpy; across processes every device holds all of it, so
    this process's first shard is the whole array."""
    if values.is_fully_addressable:
        return np.asarray(jax.device_get(values))
    return np.asarray(values.addressable_shards[0].data)


def _normalization(model: AnyRewardModel) -> tuple[np.ndarray, np.ndarray]:
    stats = model.normalization
    if not stats:
        what = ("the implicit reward has none" if isinstance(model, ImplicitRewardModel)
                else f"{model.name} stores none (config.json has no prefjax_reward_normalization)")
        raise NoNormalizationError(f"normalize=True needs the reward's training-set mean and std, but {what}; "
                                   "score without normalize=True (--normalize), or export the reward model trained with "
                                   "reward.normalize=True")
    mean = np.asarray(stats["mean"], np.float32).reshape(-1)
    std = np.asarray(stats["std"], np.float32).reshape(-1)
    if mean.shape != (model.num_labels,) or std.shape != (model.num_labels,) or not np.all(std > 0):
        raise NoNormalizationError(f"{model.name}: normalization statistics must be a mean and a std > 0 per "
                                   f"label ({model.num_labels}), got {dict(stats)}")
    return mean, std
