"""Supervised fine-tuning as a registered loss: the NLL of the desirable responses.

SFT before preference tuning (the quick start's first stage), a retain term, or an
anchor in a mixture all train the same trainer on the same data path as the
preference losses. The data are unpaired examples (prompt, completion, label);
demonstrations carry label 1. An example labelled 0 is left out of the mean
(`LossOutput.keep`), so SFT on a thumbs-up/down file fits only the thumbs-up half.

Normalisation (`normalize`), given that the trainer averages the per-example losses
over the kept examples:

- "tokens" (default): the batch's summed NLL over its token count, as TRL's SFTTrainer
  and most SFT code compute it. Each example's loss is its NLL divided by the batch's
  mean response length (a batch statistic without gradient), so the trainer's mean is
  sum NLL / sum length exactly. Under gradient accumulation the mean length is each
  micro-batch's.
- "sequence": each response's own per-token NLL, so every response weighs the same
  whatever its length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses import logspace
from prefjax.losses.hparam_domains import Choice
from prefjax.losses.registry import register
from prefjax.losses.types import LossOutput, UnpairedLogps

NORMALIZATIONS = ("tokens", "sequence")


@register(
    "sft",
    inputs=UnpairedLogps,
    requires=("length",),
    paper="Supervised fine-tuning (maximum likelihood on demonstrations; Ouyang et al. 2022, "
    "Training language models to follow instructions with human feedback, step 1)",
    equation="-log pi_theta(y|x) / mean_batch |y| (normalize='tokens'; or / |y|) on desirable examples "
    "(label 1); undesirable ones are left out",
    domains={"normalize": Choice(why="what each NLL is divided by: the batch's mean length or its own",
                               choices=NORMALIZATIONS)},
)
def sft(up: UnpairedLogps, *, normalize: str = "tokens") -> LossOutput:
    """Negative log-likelihood of each desirable response, per token (module docstring)."""
    desirable = jnp.asarray(up.label) > 0
    nll = -logspace.f32(up.logps)
    length = logspace.f32(up.length)
    per_token = logspace.safe_divide(nll, length)
    if normalize == "tokens":
        kept = desirable if up.weight is None else desirable & (logspace.f32(up.weight) > 0)
        mean_length = jax.lax.stop_gradient(logspace.weighted_batch_mean(length, kept.astype(jnp.float32)))
        losses = logspace.safe_divide(nll, mean_length)
    else:
        losses = per_token
    metrics = {"nll": jax.lax.stop_gradient(per_token), "logps": jax.lax.stop_gradient(-nll)}
    return LossOutput(losses=jnp.where(desirable, losses, 0.0), metrics=metrics,
                      keep=desirable.astype(jnp.float32))
