"""Tiny reward models for the scoring tests, built in memory from the llama2 fixture (2 layers,
hidden 64, context 64): an explicit one with a random 2-label head, and an implicit one whose
policy is the fixture's weights nudged by noise and whose reference is the fixture itself."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from prefjax import reward
from prefjax.models import hf_checkpoint

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "llama2"
LABELS = ("helpfulness", "safety")


@functools.cache
def fixture():
    return hf_checkpoint.load(FIXTURE)


def head(num_labels: int = len(LABELS), seed: int = 0) -> np.ndarray:
    d = hf_checkpoint.load_config(FIXTURE).hidden_size  # no weights read: multi-process scripts load their own
    return np.random.default_rng(seed).normal(0.0, (d + 1) ** -0.5, (d, num_labels)).astype(np.float32)


def explicit(labels=LABELS, normalization=None) -> reward.RewardModel:
    ck = fixture()
    return reward.RewardModel(ck.cfg, ck.graphdef, ck.params, head(len(labels)), tuple(labels), ck.tokenizer,
                              normalization=normalization, pad_token_id=3, name="tiny-rm")


@functools.cache
def shared_explicit() -> reward.RewardModel:
    """One explicit model for the tests that do not count its compiled programs (they reuse them)."""
    return explicit()


@functools.cache
def policy_params(scale: float = 0.05):
    leaves, tree = jax.tree.flatten(fixture().params)
    rng = np.random.default_rng(1)
    nudged = [np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    return jax.tree.unflatten(tree, nudged)


def implicit(beta: float = 0.1) -> reward.ImplicitRewardModel:
    ck = fixture()
    return reward.ImplicitRewardModel(ck.cfg, ck.graphdef, policy_params(), ck.cfg, ck.graphdef, ck.params,
                                      beta=beta, tokenizer=ck.tokenizer, name="tiny-implicit")
