"""Quick start: prefjax's whole job on a synthetic task with a verifiable reward (no downloads).

    python -m prefjax.main --config=configs/quickstart.py --workdir=/tmp/prefjax-quickstart

1. task: "a+b=" prompts (a, b <= 29), answered character by character; reward 1 for the
   exact sum, else 0 (prefjax/quickstart/tasks.py; --config.task=sentiment for the DPO
   paper's controlled-sentiment setting with a lexicon reward);
2. SFT: a 2-layer, 64-wide Llama-style decoder imitates a noisy demonstrator that is right
   30% of the time (its slips are off by 1, 2 or 10), 1500 steps;
3. West-of-N: 8 samples for each of 2048 prompts from the SFT policy; best vs worst by reward
   become the preference pairs (workdir/pairs/train.jsonl, raw JSONL rows prefjax.data reads);
4. preference tuning with prefjax.train: DPO (beta 0.1) from the SFT model against the frozen
   SFT reference, 400 steps of 64 pairs;
5. evaluation on 256 fresh prompts x 4 samples: mean ground-truth reward, KL(policy || SFT)
   from samples, win rate against the SFT policy, reward accuracy on held-out pairs; a
   summary table, workdir/summary.json and PNG plots in workdir/plots/.

Expected (seeds 0-2, mean ± sd; about 100 s on 2 CPU cores, compilation included): the SFT
policy answers 29% ± 2% of prompts correctly and DPO lifts that to 88% ± 3%, at a KL of
2.0 ± 0.3 nats, winning 79% ± 1% of comparisons with the SFT policy; its implicit reward
ranks 99% of held-out pairs correctly. Best-of-8 sampling from the SFT policy reaches 93%.

Any registered loss runs through the same job. Switching the loss on the command line starts
from that loss's paper defaults (a "note:" line says which values were reset), and any of its
hyperparameters can be set there (prefjax.train.overrides):
    --config.loss_name=ipo --config.loss.beta=0.5
    --config.loss_name=simpo --config.loss.gamma=0.5
Naming the loss in the argument does the same inside the file: --config=configs/quickstart.py:simpo
":small" shrinks everything (on the sentiment task, which a tiny model learns in a few hundred
steps) to a run of well under a minute for tests and the notebook; it combines with a loss
name: --config=configs/quickstart.py:small,kto
"""

from __future__ import annotations

from typing import Optional

import ml_collections

SMALL = "small"


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """The quick-start config. `arg`: a loss name (fills config.loss with that loss's paper
    defaults), "small" (the shrunken run), or both, comma-separated ("small,ipo")."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    small = SMALL in parts
    loss_names = [p for p in parts if p != SMALL]
    if len(loss_names) > 1:
        raise KeyError(f"name at most one loss in the config argument, got {loss_names}")

    config = ml_collections.ConfigDict()
    config.job = "quickstart"
    config.seed = 0
    config.reuse = ""  # a workdir whose task, SFT model and pairs this run reuses (sweeps)

    # Stage 1: the task (prefjax/quickstart/tasks.py) and each task's options.
    config.task = "arithmetic"
    config.arithmetic = dict(max_operand=29, p_correct=0.3)
    config.sentiment = dict(max_clauses=3)

    # Stage 2: supervised fine-tuning of a tiny Llama-family decoder.
    config.model = dict(hidden_size=64, num_layers=2, num_heads=4, head_dim=16, intermediate_size=256)
    config.sft = dict(steps=1500, batch_size=64, examples=20_000, learning_rate=3e-3, warmup_steps=0.05,
                      weight_decay=0.01, log_every=100)

    # Stage 3: West-of-N pairs (list_size: responses per ranked list, for listwise losses).
    config.west_of_n = dict(prompts=2048, n=8, heldout_prompts=256, temperature=1.0, list_size=4)

    # Stage 4: preference tuning with prefjax.train (label_noise: fraction of pairs flipped).
    config.loss_name = "dpo"
    config.loss = dict(beta=0.1)
    config.total_steps = 400
    config.tune = dict(batch_size=64, learning_rate=1e-3, warmup_steps=0.1, log_every=10,
                       label_noise=0.0)

    # Stage 5: evaluation.
    config.eval = dict(prompts=256, samples=4, temperature=1.0)

    if small:
        # The sentiment task: a tiny model learns its demonstrator in a few hundred steps.
        config.task = "sentiment"
        config.model.update(hidden_size=32, intermediate_size=128, head_dim=8)
        config.sft.update(steps=300, batch_size=32, examples=4000, log_every=50)
        config.west_of_n.update(prompts=256, heldout_prompts=64)
        config.total_steps = 30
        config.tune.update(batch_size=32, log_every=5)
        config.eval.update(prompts=64, samples=2)
    if loss_names:
        # Imported here so that the default config builds without importing jax.
        from prefjax.losses import registry

        spec = registry.get(loss_names[0])
        config.loss_name = loss_names[0]
        config.loss = dict(spec.hparam_defaults)
    return config
