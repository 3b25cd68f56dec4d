"""Reward models on Qwen2.5-0.5B-Instruct: Bradley-Terry on UltraFeedback, or HelpSteer2's regression.

    python -m prefjax.main --config=configs/reward_model.py --workdir=/tmp/rm-uf
    python -m prefjax.main --config=configs/reward_model.py:helpsteer2 --workdir=/tmp/rm-hs2

Default ("" or "bradley_terry"): a pairwise reward model (loss bradley_terry, TRL's
RewardTrainer recipe: full fine-tuning, learning rate 1e-5, one epoch, reward centering 0.01)
on trl-lib/ultrafeedback_binarized, evaluated on its test split every 200 steps (held-out
accuracy, margins, calibration: eval/rewards/chosen_probability against eval/rewards/accuracies,
eval/rewards/brier).
"helpsteer2": a multi-attribute regression reward model (loss rating_regression) on
nvidia/HelpSteer2's five ratings (helpfulness, correctness, coherence, complexity, verbosity),
as in the HelpSteer2 paper's regression models.

Both start from the Hub model (downloaded through huggingface_hub on first use), draw a fresh
head N(0, 1/(D+1)), read each response's reward at its end-of-turn token, and export at the end
a Qwen2ForSequenceClassification folder (<workdir>/hf_export) with id2label and the rewards'
mean and std over the training data, which transformers loads and `prefjax.reward.load` scores
with. A ":test" suffix ("test", "helpsteer2:test") swaps in the test fixtures (a tiny local
Qwen2 folder and small files in the same row formats; 2 steps, no download), which
tests/train/test_reward_training.py trains.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from prefjax.train import config_lib

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
VARIANTS = ("bradley_terry", "helpsteer2")
HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
_FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The experiment `arg` ("bradley_terry" by default, or "helpsteer2"), ":test" for the fixtures."""
    variant, _, test = (arg or "").partition(":")
    if variant == "test" and not test:
        variant, test = "", "test"
    variant = variant or "bradley_terry"
    if variant not in VARIANTS or test not in ("", "test"):
        raise ValueError(f"configs/reward_model.py takes one of {list(VARIANTS)}, optionally with ':test', "
                         f"got {arg!r}")
    c = config_lib.trainer_config()
    c.model.hf_folder = MODEL
    c.model.param_dtype = "float32"  # full fine-tuning: float32 master weights
    c.model.dtype = "bfloat16"
    c.data.max_len = 1024
    c.data.max_prompt_len = 512
    c.data.batch_size = 32
    c.grad_accum = 4
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 0.03
    c.log_every, c.eval_every, c.eval_batches, c.checkpoint.every = 10, 200, 16, 200

    if variant == "bradley_terry":
        c.loss_name = "bradley_terry"
        c.loss = ml_collections.ConfigDict({"center_rewards_coefficient": 0.01})
        c.data.source = c.data.eval_source = "hf:trl-lib/ultrafeedback_binarized"
        c.data.split, c.data.eval_split = "train", "test"
        c.total_steps = 1900  # about one epoch of its 62k pairs at 32 a step
    else:
        c.loss_name = "rating_regression"
        c.reward.num_labels = len(HELPSTEER2_ATTRIBUTES)
        c.reward.labels = HELPSTEER2_ATTRIBUTES
        c.data.source = c.data.eval_source = "hf:nvidia/HelpSteer2"
        c.data.split, c.data.eval_split = "train", "validation"
        c.optimizer.learning_rate = 2e-6
        c.total_steps = 650  # about one epoch of its 20k rated responses at 32 a step

    if test:
        c.total_steps = 2
        c.model.hf_folder = str(_FIXTURES / "hf" / "qwen2")
        c.model.param_dtype = c.model.dtype = "float32"  # CPU
        if variant == "bradley_terry":
            c.data.source = c.data.eval_source = str(_FIXTURES / "data" / "trl_ultrafeedback.jsonl")
        else:
            c.data.source = str(_FIXTURES / "data" / "helpsteer2" / "train.jsonl")
            c.data.eval_source = str(_FIXTURES / "data" / "helpsteer2" / "validation.jsonl")
        c.data.max_len, c.data.max_prompt_len = 64, 32
        c.data.batch_size, c.grad_accum = 8, 1
        c.optimizer.learning_rate = 1e-2
        c.log_every, c.eval_every, c.eval_batches, c.checkpoint.every = 1, 0, 1, 2
    return c
