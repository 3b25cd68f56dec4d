"""Bring your own model and data: DPO with LoRA on Qwen2.5-0.5B-Instruct and UltraFeedback from the Hub.

    python -m prefjax.main --config=configs/byo_qwen_ultrafeedback_lora.py --workdir=/tmp/byo-qwen

The model is the Hub id Qwen/Qwen2.5-0.5B-Instruct and the data the Hub dataset
trl-lib/ultrafeedback_binarized (its train split to train on, its test split for evaluation),
both downloaded through huggingface_hub on first use and read from its cache afterwards.
Rows are chosen/rejected conversations whose shared first message is the prompt (TRL's
conversational format; data.format "auto" detects it). LoRA adapters (rank 16) on the
attention and MLP matmuls are trained; the reference is the base model with the adapters
off (reference.kind "auto" -> "lora"), so no second copy of the weights is held. Weights and
compute in bfloat16 (adapters stay float32), sequences of at most 1024 tokens, 32 pairs per
step in 4 micro-batches of 8: sized for one 80 GB accelerator. README.md ("Bring your own
model and data") has the expected time per step (computed, not measured) and the commands
to look at the data first.

"test" shrinks it to the test fixtures (a tiny local Qwen2 folder and a 16-row file in the
same row format, 2 steps; no download), which tests/test_byo_config.py trains:

    python -m prefjax.main --config=configs/byo_qwen_ultrafeedback_lora.py:test --workdir=/tmp/byo-test
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from prefjax.train import config_lib

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DATASET = "hf:trl-lib/ultrafeedback_binarized"
TEST = "test"
_FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The experiment; `arg` "test" swaps in the test fixtures and a 2-step run."""
    if arg not in (None, "", TEST):
        raise ValueError(f"configs/byo_qwen_ultrafeedback_lora.py takes no argument or {TEST!r}, got {arg!r}")
    c = config_lib.trainer_config()
    c.total_steps = 2000  # about one epoch of the train split at 32 pairs a step

    c.model.hf_folder = MODEL  # a Hub id; "owner/name@revision" pins a revision; a local folder works too
    c.model.param_dtype = "bfloat16"  # the frozen base: half the memory of float32
    c.model.dtype = "bfloat16"

    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0

    c.loss_name = "dpo"
    c.loss = ml_collections.ConfigDict({"beta": 0.1})
    c.reference.kind = "auto"  # with LoRA: the base model, adapters off

    c.data.source = DATASET
    c.data.split = "train"
    c.data.eval_source = DATASET
    c.data.eval_split = "test"
    c.data.format = "auto"  # detected from the columns; the start-up report says what it found
    c.data.on_error = "error"  # a malformed row stops the run naming it; "skip" counts and skips such rows
    c.data.max_len = 1024
    c.data.max_prompt_len = 512  # long prompts keep their end, so the response always fits
    c.data.batch_size = 32
    c.grad_accum = 4  # micro-batches of 8 pairs (16 rows of at most 1024 tokens)

    c.optimizer.learning_rate = 5e-5  # LoRA takes a larger rate than full fine-tuning
    c.optimizer.warmup_steps = 0.05
    c.log_every = 10
    c.eval_every = 200
    c.eval_batches = 8
    c.checkpoint.every = 200

    if arg == TEST:
        c.total_steps = 2
        c.model.hf_folder = str(_FIXTURES / "hf" / "qwen2")
        c.model.param_dtype = c.model.dtype = "float32"  # CPU
        c.lora.rank, c.lora.alpha = 4, 8.0
        c.data.source = c.data.eval_source = str(_FIXTURES / "data" / "trl_ultrafeedback.jsonl")
        c.data.max_len, c.data.max_prompt_len = 64, 32
        c.data.batch_size, c.grad_accum = 8, 1
        c.optimizer.learning_rate = 1e-2
        c.log_every, c.eval_every, c.eval_batches, c.checkpoint.every = 1, 0, 1, 2
    return c
