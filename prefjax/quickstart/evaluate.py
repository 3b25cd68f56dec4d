"""Evaluation against the ground truth: reward, KL to the reference, win rate, reward accuracy.

    ev = evaluate.Evaluator(task, tokenizer, reference, prompts, heldout_pairs, samples=4, seed=0)
    ev.evaluate(policy)     # {"reward": ..., "reward_se": ..., "kl": ..., "win_rate": ..., ...}

For a policy pi and the frozen reference pi_ref (the SFT model), on fixed held-out prompts:

- reward: mean ground-truth reward of fresh samples y ~ pi(. | x) (`samples` per prompt),
  with its standard error over prompts (reward_se);
- kl: KL(pi || pi_ref) per prompt, estimated from the same samples as the mean of
  log pi(y | x) - log pi_ref(y | x), both scored with prefjax.scoring on the full
  sequence (EOS included). Unbiased; an individual estimate can be negative;
- win_rate: P(r(x, y) > r(x, y_ref)) + P(tie) / 2, with y ~ pi and y_ref ~ pi_ref drawn
  independently for the same prompt (the reference's samples are drawn once);
- reward_accuracy: on held-out West-of-N pairs (from the SFT policy, never trained on),
  how often the implicit reward log pi/pi_ref ranks the chosen response above the
  rejected one (ties count one half, so the reference itself scores exactly 0.5);
- complete: the fraction of samples that ended with EOS in the task's vocabulary.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from prefjax.models.tokenizer import Tokenizer
from prefjax.quickstart import rollouts
from prefjax.quickstart.tasks import Task
from prefjax.quickstart.west_of_n import PairSet


def win_rate(rewards: np.ndarray, baseline: np.ndarray) -> float:
    """P(reward > baseline) + P(tie) / 2 over aligned samples."""
    rewards, baseline = np.asarray(rewards), np.asarray(baseline)
    return float(np.mean(rewards > baseline) + 0.5 * np.mean(rewards == baseline))


def pair_accuracy(margins: np.ndarray) -> float:
    """Fraction of positive margins, ties counting one half."""
    margins = np.asarray(margins)
    return float(np.mean(margins > 0) + 0.5 * np.mean(margins == 0))


class Evaluator:
    """Evaluates policies against one reference on fixed prompts and held-out pairs."""

    def __init__(self, task: Task, tokenizer: Tokenizer, reference: rollouts.Model, prompts: Sequence[str],
                 heldout: Optional[PairSet], *, samples: int, seed: int, temperature: float = 1.0):
        if samples < 1:
            raise ValueError(f"eval.samples must be >= 1, got {samples}")
        self.task, self.tokenizer, self.reference = task, tokenizer, reference
        self.samples, self.seed, self.temperature = samples, seed, temperature
        self.prompts = [p for p in prompts for _ in range(samples)]
        self.length = rollouts.row_length(task)
        self.pad_id = tokenizer.pad_token_id
        ref = rollouts.sample(reference, tokenizer, task, self.prompts, seed=seed + 1,
                              temperature=temperature)
        self.reference_rewards = ref.rewards(task)
        self.pairs = None
        if heldout is not None and len(heldout):
            chosen = rollouts.from_texts(tokenizer, heldout.prompts, heldout.chosen)
            rejected = rollouts.from_texts(tokenizer, heldout.prompts, heldout.rejected)
            self.pairs = (chosen, rejected, self._logps(reference, chosen), self._logps(reference, rejected))

    def _logps(self, model: rollouts.Model, responses: rollouts.Responses) -> np.ndarray:
        return rollouts.sequence_logps(model, responses, pad_id=self.pad_id, length=self.length)

    def evaluate(self, policy: rollouts.Model) -> dict[str, float]:
        """The metrics of the module docstring for `policy`."""
        out = rollouts.sample(policy, self.tokenizer, self.task, self.prompts, seed=self.seed + 2,
                              temperature=self.temperature)
        rewards = out.rewards(self.task)
        log_ratio = self._logps(policy, out) - self._logps(self.reference, out)
        per_prompt = rewards.reshape(-1, self.samples).mean(axis=1)
        se = per_prompt.std(ddof=1) / np.sqrt(len(per_prompt)) if len(per_prompt) > 1 else 0.0
        metrics = {
            "reward": float(rewards.mean()),
            "reward_se": float(se),
            "kl": float(log_ratio.mean()),
            "win_rate": win_rate(rewards, self.reference_rewards),
            "complete": float(out.complete.mean()),
        }
        if self.pairs is not None:
            chosen, rejected, ref_chosen, ref_rejected = self.pairs
            margins = ((self._logps(policy, chosen) - ref_chosen)
                       - (self._logps(policy, rejected) - ref_rejected))
            metrics["reward_accuracy"] = pair_accuracy(margins)
        return metrics
