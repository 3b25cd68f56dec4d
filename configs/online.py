"""Online and iterative preference learning on the quick start's arithmetic task (job="online").

    python -m prefjax.main --config=configs/online.py:online_dpo --workdir=/tmp/online \
        --config.model.hf_folder=/tmp/prefjax-quickstart/sft/model

Every step samples 2 answers for each of 64 fresh "a+b=" prompts from the policy being
trained (on the trainer's own mesh, from the parameters the last step produced), scores
them with the task's verifiable reward (1 for the exact sum), pairs the better against the
worse and takes a DPO step on those pairs; samples, rewards and log-probs of every round go
to <workdir>/samples (readable by prefjax.data). model.hf_folder is the policy to start
from: the quick start's SFT model (`python -m prefjax.main --config=configs/quickstart.py
--workdir=/tmp/prefjax-quickstart` writes it), or any causal LM whose tokenizer covers the
task. The argument picks the algorithm (prefjax.online.algorithms), with its loss and the
paper's settings:

    :online_dpo      Guo et al. 2024: K=2 fresh samples per step, DPO
    :iterative_dpo   RLHF Workflow: rounds of 512 prompts x 4 samples, best vs worst, 2 epochs,
                     reference = the previous iterate
    :xpo             Xie et al. 2024: a policy sample against a reference sample, DPO + alpha log pi(y_ref)
    :nash_md         Munos et al. 2023: the policy's sample against one from the token-level
                     mixture of policy and reference, P(y > y') from the reward
    :sppo            Wu et al. 2024: K=4 samples, win rates, squared loss against pi_t (the sampler)
    :inpo            Zhang et al. 2024: K=2 samples from pi_t, the preferred one, INPO's loss
    :hypo            Song et al. 2024: offline DPO on data.source's pairs plus a KL term on one fresh
                     policy sample per pair (no reward function); e.g. the quick start's West-of-N pairs:
                     --config.data.source=/tmp/prefjax-quickstart/pairs/train.jsonl
Add ",test" (e.g. :nash_md,test) for a run of a few seconds (tests and the notebook).
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from prefjax.losses import registry
from prefjax.online import algorithms
from prefjax.train import config_lib

TEST = "test"


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    test = TEST in parts
    names = [p for p in parts if p != TEST] or ["online_dpo"]
    if len(names) > 1:
        raise KeyError(f"name at most one algorithm in the config argument, got {names}")
    algorithm = algorithms.get(names[0])

    config = config_lib.trainer_config()
    config.job = "online"
    config.online.algorithm = algorithm.name
    config.loss_name = algorithm.default_loss
    config.loss = ml_collections.ConfigDict(registry.get(algorithm.default_loss).hparam_defaults)
    config.online.prompts = "task:arithmetic"
    config.online.reward.sources = ("task:arithmetic",)
    config.online.max_new_tokens = 8  # answers are at most 2 digits and EOS
    config.data.batch_size = 64
    config.data.max_len = 16
    config.total_steps = 400
    config.optimizer.update(learning_rate=1e-3, warmup_steps=20)
    config.checkpoint.every = 100
    config.log_every = 10
    if algorithm.name == "iterative_dpo":
        config.online.samples_per_prompt = 4
        config.online.prompts_per_round = 512
        config.online.epochs_per_round = 2
    if algorithm.name == "sppo":
        config.online.samples_per_prompt = 4
    if algorithm.offline:
        config.online.prompts = ""
        config.online.reward.sources = ()
        config.data.source = "/tmp/prefjax-quickstart/pairs/train.jsonl"  # the quick start's West-of-N pairs
    if test:
        config.data.batch_size = 8
        config.total_steps = 4
        config.log_every = 1
        config.checkpoint.every = 2
        config.optimizer.update(warmup_steps=1)
        if config.online.prompts_per_round:
            config.online.prompts_per_round = 16
    return config
