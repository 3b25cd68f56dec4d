"""Reward models as a product: load one (explicit or implicit) and score with it.

    from prefjax import reward
    rm = reward.load("out/hf_export")                              # *ForSequenceClassification folder or Hub id
    irm = reward.load_implicit("out/dpo", "out/sft", beta=0.1)     # beta * log(policy / reference)
    rewards = reward.score(rm, prompts, responses)                 # [N, L] float32
    rewards = reward.score_ids(rm, input_ids, attention_mask)      # pre-tokenized, left or right padded

Command line (a preference or completion file -> the same rows with rewards, as JSONL):

    python -m prefjax.reward.score_file --model DIR|HUB_ID --input prefs.jsonl --output scored.jsonl

Modules: `model` (the two kinds of reward model, loading, their jitted programs), `batching`
(length buckets and placed batches), `scorer` (text, messages or ids -> rewards), `score_file`
(the command line).
"""

from prefjax.reward.model import (
    IMPLICIT_LABEL,
    ImplicitRewardModel,
    NoNormalizationError,
    RewardModel,
    RewardModelError,
    TokenizerMismatchError,
    load,
    load_implicit,
)
from prefjax.reward.scorer import ContextLengthError, ScoreInputError, score, score_examples, score_ids

__all__ = [
    "IMPLICIT_LABEL", "ContextLengthError", "ImplicitRewardModel", "NoNormalizationError", "RewardModel",
    "RewardModelError", "ScoreInputError", "TokenizerMismatchError", "load", "load_implicit", "score",
    "score_examples", "score_ids",
]
