"""Online and iterative preference learning: sample from the live policy, score, update.

The trainer's loop (prefjax.train.loop) runs unchanged; an `OnlineSource`
(prefjax.online.source) is its batch source, sampling with prefjax.sampling from the
policy parameters the last step produced, on the trainer's own mesh.

    rewards.py   where rewards and preferences come from (Python functions, reward models, judges)
    pairs.py     K scored samples per prompt -> training examples (West-of-N, win rates, ...)
    prompts.py   prompt streams (the quick start's tasks, or any data source with prompts)
    store.py     the sample store: every round's samples, bounded, readable by prefjax.data
    rollout.py   sampling and reference scoring on the trainer's mesh
    algorithms.py  the named algorithms (online DPO, iterative DPO, XPO, Nash-MD, SPPO, INPO, HyPO)
    source.py    the batch source the loop reads
    job.py       job="online": python -m prefjax.main --config=configs/online_dpo.py --workdir=DIR
"""
