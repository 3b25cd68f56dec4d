"""job="online": the trainer, reading batches sampled from the policy it trains.

    python -m prefjax.main --config=configs/online.py:nash_md --workdir=/tmp/online

`run(config, workdir)` checks the online section, then runs prefjax.train.run with an
OnlineSource (prefjax.online.source). The reference's log-probs always come with the
batches (the source scores the samples with the starting weights when it draws them, or
uses the sampler's own log-probs), so the step never runs a reference forward:
reference.kind is "precomputed" for the step, whatever the config says ("auto" or
"precomputed" are accepted; another kind is an error naming the online key to use).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections

from prefjax.online import algorithms
from prefjax.online import source as source_lib
from prefjax.train import config_lib

REFERENCE_MODES = ("auto", "initial", "previous_iterate")
PAIR_RULES = ("best_worst", "random")


def _fail(message: str) -> None:
    raise config_lib.ConfigError(message)


def check(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """ConfigError for an online section (and the trainer keys it touches) that cannot run."""
    o = config.online
    try:
        algorithm = algorithms.get(o.algorithm)
    except ValueError as err:
        raise config_lib.ConfigError(str(err)) from None
    problem = algorithm.check_loss(config.loss_name)
    if problem:
        _fail(f"{problem}; set loss_name (e.g. {algorithm.default_loss!r})")
    if o.reference not in REFERENCE_MODES:
        _fail(f"online.reference={o.reference!r}; choose one of {list(REFERENCE_MODES)}")
    if config.reference.kind not in ("auto", "precomputed"):
        _fail(f"reference.kind={config.reference.kind!r}: an online run's reference log-probs come with its "
              "samples; leave reference.kind='auto' and choose online.reference ('initial' or 'previous_iterate')")
    if config.reference.refresh != "none":
        _fail("reference.refresh does not apply to online runs: online.reference='previous_iterate' makes the "
              "reference the policy that drew each round's samples")
    if o.pairs not in PAIR_RULES:
        _fail(f"online.pairs={o.pairs!r}; choose one of {list(PAIR_RULES)}")
    if algorithm.samples is None and o.samples_per_prompt < 2:
        _fail(f"online.samples_per_prompt={o.samples_per_prompt}: {o.algorithm} compares samples, so it needs >= 2")
    if algorithm.offline:
        if o.prompts:
            _fail(f"online.prompts={o.prompts!r}: {o.algorithm} samples for the prompts of data.source's pairs; "
                  "leave online.prompts empty")
        if not config.data.source or config.data.source == "synthetic":
            _fail(f"{o.algorithm} trains on offline pairs: set data.source to a preference dataset")
        if o.prompts_per_round:
            _fail(f"{o.algorithm} samples every step: set online.prompts_per_round=0")
    elif not o.reward.sources:
        _fail("online.reward.sources is empty: name where rewards come from, e.g. ('task:arithmetic',), "
              "('my_module:reward_fn',) or ('rm:/path/to/reward_model',)")
    if o.reward.sources and o.reward.weights and len(o.reward.weights) != len(o.reward.sources):
        _fail(f"online.reward.weights has {len(o.reward.weights)} values for {len(o.reward.sources)} sources")
    if not (o.prompts or (config.data.source and config.data.source != "synthetic")):
        _fail("online.prompts is empty and data.source is 'synthetic': set online.prompts to 'task:arithmetic', "
              "a data file or a Hub dataset with prompts")
    if o.max_new_tokens < 1:
        _fail(f"online.max_new_tokens={o.max_new_tokens} must be >= 1")
    if source_lib.prompt_width(config) < 1:
        _fail(f"data.max_len={config.data.max_len} leaves no room for a prompt before online.max_new_tokens="
              f"{o.max_new_tokens} sampled tokens: raise data.max_len")
    if not o.temperature > 0:
        _fail(f"online.temperature={o.temperature} must be > 0 (greedy samples of one prompt are all equal)")
    if not 0.0 < o.top_p <= 1.0:
        _fail(f"online.top_p={o.top_p} must be in (0, 1]")
    if o.top_k < 0:
        _fail(f"online.top_k={o.top_k} must be >= 0 (0 = off)")
    if not 0.0 <= o.mixture_coef <= 1.0:
        _fail(f"online.mixture_coef={o.mixture_coef} must be in [0, 1]")
    if o.epochs_per_round < 1:
        _fail(f"online.epochs_per_round={o.epochs_per_round} must be >= 1")
    if o.prompts_per_round < 0 or (o.prompts_per_round and o.prompts_per_round % config.data.batch_size):
        _fail(f"online.prompts_per_round={o.prompts_per_round} must be 0 (every step) or a multiple of "
              f"data.batch_size={config.data.batch_size}")
    if config.data.pack:
        _fail("online batches hold one example per row (data.share_prefix=True puts a prompt once before its "
              "samples): set data.pack=False")
    if o.store.keep_rounds < 1:
        _fail(f"online.store.keep_rounds={o.store.keep_rounds} must be >= 1 (a resume reads the current round)")
    devices = jax.device_count() if num_devices is None else num_devices
    chunk = (o.sample_batch or config.data.batch_size) * source_lib.samples_per_prompt(config)
    data_devices = math.gcd(devices, config.data.batch_size) if devices else 1
    if o.sample_batch < 0 or chunk % data_devices:
        _fail(f"online.sample_batch={o.sample_batch}: each sampler call's rows must split over the data devices")


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config the trainer runs: checked, with the step's reference read from the batches."""
    check(config)
    config = copy.deepcopy(config)
    config.reference.kind = "precomputed"
    return config


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains `config` online under `workdir` (rerunning resumes); the trainer's summary."""
    from prefjax import train  # pylint: disable=import-outside-toplevel

    config = prepare(config)
    return train.run(config, str(workdir), source=source_lib.OnlineSource(config, workdir))
