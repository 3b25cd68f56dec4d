"""The quick-start pipeline: a synthetic task with a verifiable reward, end to end.

    python -m prefjax.main --config=configs/quickstart.py --workdir=/tmp/quickstart

Stages (each a module): `tasks` (prompts, a noisy demonstrator, the ground-truth
reward), `vocab` (a tokenizer for the task), `sft` (supervised fine-tuning of a tiny
model through prefjax.train with the `sft` loss), `rollouts` (sampling and scoring with
prefjax.sampling / prefjax.scoring),
`west_of_n` (best-vs-worst preference pairs written as a JSONL dataset),
preference tuning with prefjax.train, `evaluate` (reward, KL, win rate, reward
accuracy), `plots`, and `pipeline` which runs them in order. `frontier`,
`label_noise` and `reward_model` run the experiments of configs/quickstart_frontier.py,
configs/quickstart_label_noise.py and configs/quickstart_reward_model.py in-process.
"""
