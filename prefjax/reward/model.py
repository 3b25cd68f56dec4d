"""Reward models to score with: an explicit head on a decoder, or a policy/reference pair.

    rm = load("out/hf_export_rm")                              # a *ForSequenceClassification folder
    rm = load("owner/name@rev", mesh=mesh)                      # a Hub id (prefjax.models.hub)
    irm = load_implicit("out/dpo_policy", "out/sft", beta=0.1)  # beta * log(pi(y|x) / ref(y|x))

Both kinds answer the same questions for prefjax.reward.scorer: their tokenizer and render
options (how a prompt + response becomes tokens), the labels of their L outputs, the longest
input they take, and `program(mesh)`: one jitted function (arrays, Batch) -> rewards [B, L]
built on prefjax.scoring.score, with the arrays it needs placed on the mesh. The program
is made once per mesh and compiles once per (row length, rows) shape.

An explicit reward is the head [D, L] on the hidden state of the response's last real token
(prefjax.scoring.last_token_positions). An implicit reward is beta times the difference of
the two models' log-probabilities summed over the response's scored tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from prefjax import scoring
from prefjax import sharding as sharding_lib
from prefjax.batch import Batch
from prefjax.data.tokenize import RenderOptions
from prefjax.models import hf_checkpoint, hub
from prefjax.models import params as params_lib
from prefjax.models.config import ModelConfig
from prefjax.models.tokenizer import Tokenizer

IMPLICIT_LABEL = "implicit_reward"
# (arrays placed on the mesh, Batch) -> rewards [B, L] float32
Program = Callable[[Any, Batch], jax.Array]


class RewardModelError(ValueError):
    """A reward model that cannot be loaded or used as asked; the message says what to do."""


class TokenizerMismatchError(RewardModelError):
    """A policy and a reference whose tokenizers give different ids to the same text."""


class NoNormalizationError(RewardModelError):
    """normalize=True with a reward model that stores no normalisation statistics."""


@dataclasses.dataclass(eq=False)
class RewardModel:
    """A decoder with a linear reward head [D, L] (no bias) read at the last real token.

    `normalization`: {"mean": [L], "std": [L]} over the training set, or None. `mesh`: where
    `params` already live (a model loaded with a mesh); scoring defaults to it.
    """

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: Any
    head: Any  # [D, L] float32
    labels: tuple[str, ...]
    tokenizer: Tokenizer
    normalization: dict | None = None
    pad_token_id: int | None = None
    name: str = "reward model"  # the folder or Hub id, for messages
    mesh: Mesh | None = None
    render: RenderOptions = dataclasses.field(default_factory=RenderOptions)
    _programs: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        shape = tuple(np.shape(self.head))
        if len(shape) != 2 or shape[0] != self.cfg.hidden_size or shape[1] != len(self.labels):
            raise RewardModelError(f"{self.name}: the reward head has shape {list(shape)}, expected "
                                   f"[hidden_size={self.cfg.hidden_size}, num_labels={len(self.labels)}] "
                                   f"for labels {list(self.labels)}")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def context(self) -> int:
        """The longest prompt + response the model takes (config.json max_position_embeddings)."""
        return self.cfg.max_position_embeddings

    @property
    def pad_id(self) -> int:
        return _pad_id(self.pad_token_id, self.tokenizer)

    def program(self, mesh: Mesh | None) -> tuple[Program, Any]:
        """(the jitted reward function, its arrays placed on `mesh`) for `mesh` (None: no mesh)."""
        if mesh not in self._programs:
            scorer = scoring.Model(self.cfg, self.graphdef)

            def rewards(arrays: Any, batch: Batch) -> jax.Array:
                params, head = arrays
                scores = scoring.score(scorer, params, batch, what=("rewards",), reward_head=head)
                return scores.rewards[:, 0, :]  # one response per row: [B, 1, L] -> [B, L]

            arrays = (_place(self.params, self.cfg, mesh), _place(self.head, None, mesh))
            self._programs[mesh] = (_jit(rewards, mesh), arrays)
        return self._programs[mesh]


@dataclasses.dataclass(eq=False)
class ImplicitRewardModel:
    """beta * (log policy(y|x) - log reference(y|x)), summed over the response's scored tokens (L = 1).

    The policy's tokenizer renders the inputs; the reference reads the same ids (load_implicit
    checks that the two vocabularies agree).
    """

    policy_cfg: ModelConfig
    policy_graphdef: nnx.GraphDef
    policy_params: Any
    reference_cfg: ModelConfig
    reference_graphdef: nnx.GraphDef
    reference_params: Any
    beta: float
    tokenizer: Tokenizer
    name: str = "implicit reward model"
    mesh: Mesh | None = None
    render: RenderOptions = dataclasses.field(default_factory=RenderOptions)
    _programs: dict = dataclasses.field(default_factory=dict, repr=False)

    labels: tuple[str, ...] = (IMPLICIT_LABEL,)
    normalization: dict | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool) and self.beta > 0):
            raise RewardModelError(f"{self.name}: beta must be a number > 0 (the DPO beta the policy was "
                                   f"trained with), got {self.beta!r}")
        self.beta = float(self.beta)

    @property
    def num_labels(self) -> int:
        return 1

    @property
    def context(self) -> int:
        return min(self.policy_cfg.max_position_embeddings, self.reference_cfg.max_position_embeddings)

    @property
    def pad_id(self) -> int:
        return _pad_id(None, self.tokenizer)

    def program(self, mesh: Mesh | None) -> tuple[Program, Any]:
        if mesh not in self._programs:
            policy = scoring.Model(self.policy_cfg, self.policy_graphdef)
            reference = scoring.Model(self.reference_cfg, self.reference_graphdef)
            beta = self.beta

            def rewards(arrays: Any, batch: Batch) -> jax.Array:
                policy_params, reference_params = arrays
                ratio = scoring.score(policy, policy_params, batch).logps - scoring.score(
                    reference, reference_params, batch).logps  # [B, 1]
                return beta * ratio

            arrays = (_place(self.policy_params, self.policy_cfg, mesh),
                      _place(self.reference_params, self.reference_cfg, mesh))
            self._programs[mesh] = (_jit(rewards, mesh), arrays)
        return self._programs[mesh]


# ---------------------------------------------------------------------------------------------
# Loading


def load(name: str, *, mesh: Mesh | None = None, key: str = "model") -> RewardModel:
    """The reward model of a `*ForSequenceClassification` folder or Hub id (`key` names the
    argument in error messages, e.g. "--model")."""
    folder = hub.local_folder(name, key=key)  # load_reward_model names a causal-LM folder's fix
    ckpt = hf_checkpoint.load_reward_model(folder, mesh=mesh)
    return RewardModel(cfg=ckpt.cfg, graphdef=ckpt.graphdef, params=ckpt.params, head=ckpt.head,
                       labels=tuple(ckpt.labels), tokenizer=ckpt.tokenizer, normalization=ckpt.normalization,
                       pad_token_id=ckpt.pad_token_id, name=str(name), mesh=mesh)


def load_implicit(policy: str, reference: str, *, beta: float, mesh: Mesh | None = None,
                  keys: Sequence[str] = ("policy", "reference")) -> ImplicitRewardModel:
    """The implicit reward of a policy trained against `reference` (two causal-LM folders or Hub ids)."""
    folders = [hub.local_folder(name, key=key) for name, key in zip((policy, reference), keys)]
    pol, ref = (hf_checkpoint.load(folder, mesh=mesh) for folder in folders)
    check_same_tokenizer(pol.tokenizer, ref.tokenizer, f"{keys[0]}={policy!r}", f"{keys[1]}={reference!r}")
    return ImplicitRewardModel(pol.cfg, pol.graphdef, pol.params, ref.cfg, ref.graphdef, ref.params, beta=beta,
                               tokenizer=pol.tokenizer, name=f"{policy} vs {reference}", mesh=mesh)


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, a_name: str, b_name: str) -> None:
    """Raises TokenizerMismatchError unless both tokenizers map every token to the same id."""
    va, vb = a.backend.get_vocab(with_added_tokens=True), b.backend.get_vocab(with_added_tokens=True)
    differs = None
    if va != vb:
        only = sorted(set(va) ^ set(vb))
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])
        differs = (f"{len(va)} vs {len(vb)} tokens, e.g. {only[0]!r} is in only one" if only
                   else f"token {moved[0]!r} is id {va[moved[0]]} vs {vb[moved[0]]}")
    elif (a.eos_token_id, a.bos_token_id) != (b.eos_token_id, b.bos_token_id):
        differs = (f"eos/bos ids {a.eos_token_id}/{a.bos_token_id} vs {b.eos_token_id}/{b.bos_token_id}")
    if differs is not None:
        raise TokenizerMismatchError(
            f"{a_name} and {b_name} have different tokenizers ({differs}); the implicit reward compares "
            "both models on the same token ids: give the reference the policy was trained against")


# ---------------------------------------------------------------------------------------------
# Programs and placement


def _pad_id(pad_token_id: int | None, tokenizer: Tokenizer) -> int:
    # Any id works (pads are never read), but a real one keeps embeddings in range.
    for candidate in (pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _jit(rewards: Program, mesh: Mesh | None) -> Program:
    # Replicated outputs: every process gets every row's reward (multi-host scoring).
    out = None if mesh is None else sharding_lib.replicated(mesh)
    return jax.jit(rewards, out_shardings=out)


def _place(tree: Any, cfg: ModelConfig | None, mesh: Mesh | None) -> Any:
    """`tree` on `mesh`: parameters by their logical axes (when `cfg` is given), others replicated.

    Leaves already there (a model loaded with this mesh) are kept; others are copied from the
    host, each device taking its own slice (so it works the same in every process).
    """
    if mesh is None:
        return tree
    flat_targets: dict = {}
    if cfg is not None:
        targets = params_lib.param_shardings(cfg, mesh)
        flat_targets = dict(jax.tree_util.tree_flatten_with_path(targets)[0])

    def one(path: Any, leaf: Any) -> jax.Array:
        target = flat_targets.get(path, sharding_lib.replicated(mesh))  # a path the config lacks: replicate
        if isinstance(leaf, jax.Array) and leaf.sharding == target:
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

    return jax.tree_util.tree_map_with_path(one, tree)
