"""A trained reward model's normalisation statistics: each output's mean and std over training data.

    stats = reward_stats.compute(config, setup, state, mesh, rules)   # {"mean": [L], "std": [L]}

Rewards from a Bradley-Terry model are defined up to a shift (only differences enter the loss),
so two reward models, or one model at two checkpoints, put their zero anywhere. Users who mix
rewards (best-of-N thresholds, reward-weighted losses, online methods) want them on a common
scale: the export stores these statistics (config.json, "prefjax_reward_normalization") and
`prefjax.reward.score(..., normalize=True)` applies (r - mean) / std.

They are measured once at the end of training, with the final weights, over at most
`reward.normalize_batches` batches of the training data read in order (one pass, no repeat):
every real response (weight > 0, at least one scored token) counts once.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from prefjax import scoring, sharding
from prefjax.data import streams
from prefjax.train import config_lib
from prefjax.train.state import TrainState

log = logging.getLogger(__name__)


def compute(config: ml_collections.ConfigDict, setup: Any, state: TrainState, mesh: Mesh,
            rules: Any) -> Optional[dict[str, Any]]:
    """The statistics of the module docstring; None when the data held no real response."""
    source = streams.make_stream(config, config.data.source,
                                 kind=config_lib.data_kind(config.loss_name, config.reward.num_labels),
                                 vocab_size=setup.model_cfg.vocab_size, tokenizer=setup.tokenizer, train=False)
    model, policy, fixed = setup.model, setup.spec.policy, setup.fixed

    @jax.jit
    def rewards(trainable: Any, fixed: Any, batch: Any) -> tuple[jax.Array, jax.Array]:
        params = policy.params(trainable, fixed)
        scores = scoring.score(model, params, batch, what=("rewards",), reward_head=trainable["reward_head"])
        return scores.rewards, scores.lengths

    collected = []
    try:
        for i, local in enumerate(source):
            if i >= config.reward.normalize_batches:
                break
            batch = local.to_global(mesh, rules, source.pad_id)
            values, lengths = rewards(state.params, fixed, batch)
            values, lengths, weight = (sharding.to_host(x) for x in (values, lengths, batch.weight))
            real = (lengths > 0) & (weight[:, None] > 0)  # [B, K]
            collected.append(values[real])  # [n, L]
    finally:
        source.close()
    if not collected or not sum(len(c) for c in collected):
        return None
    every = np.concatenate(collected).astype(np.float64)
    log.info("reward normalisation over %d training responses", len(every))
    return {"mean": every.mean(axis=0).tolist(), "std": every.std(axis=0).tolist()}
