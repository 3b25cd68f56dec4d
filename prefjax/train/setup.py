"""Everything a run builds before its first step: model, roles, optimizer, state, shardings.

Parameters are created (or imported from a Hugging Face folder) directly in
their shards; the optimizer state is initialised under jit into shardings
derived from the parameters'; the roles (prefjax.roles) say what is trained and
which weights the reference reads. `abstract_state` gives the state's shapes and
shardings without creating it, which is what an orbax restore onto this run's
mesh needs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefjax import models, roles, scoring
from prefjax.losses import registry
from prefjax.models import hf_checkpoint, hf_layout, hub
from prefjax.models import lora as lora_lib
from prefjax.models.config import ModelConfig
from prefjax.models.tokenizer import Tokenizer, check_fits_model, load_tokenizer
from prefjax.train import config_lib, loss_inputs, optim
from prefjax.train.state import TrainState
from prefjax.train.steps import StepSpec

log = logging.getLogger(__name__)

REWARD_MODEL_INPUTS = config_lib.REWARD_MODEL_INPUTS


class BuiltModel(NamedTuple):
    """A run's model before its roles: config, structure, sharded params, tokenizer, and the
    reward head [D, L] when model.hf_folder is a reward model (*ForSequenceClassification)."""

    cfg: ModelConfig
    graphdef: Any
    params: Any
    tokenizer: Optional[Tokenizer]
    reward_head: Optional[Any] = None


@dataclasses.dataclass
class Setup:
    """The static pieces of a run and its initial (or abstract) state."""

    model: scoring.Model
    tokenizer: Optional[Tokenizer]
    spec: StepSpec
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state: Optional[TrainState]
    state_shardings: Any
    fixed: roles.Fixed
    fixed_shardings: roles.Fixed
    replicated: NamedSharding
    initial_params: Any  # the policy's starting model params (the LoRA base): the precomputed reference's
    reward_labels: tuple[str, ...] = ()  # a reward model's output names (the loop sets them from config and data)
    reward_pad_id: int = 0  # the pad id its export records (prefjax.train.export.reward_pad_id)

    @property
    def model_cfg(self) -> ModelConfig:
        return self.model.cfg


def _model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    m = config.model
    return dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, attention_impl=m.attention_impl,
                attention_block_size=m.attention_block_size or None)


def build_model(config: ml_collections.ConfigDict, mesh: Mesh, rules: Any) -> BuiltModel:
    """The model from a preset or a Hugging Face folder (model.hf_folder / data.tokenizer: a local
    folder or a Hub id, prefjax.models.hub); a reward-model folder brings its head along."""
    m = config.model
    if m.hf_folder:
        folder = hub.local_folder(m.hf_folder, key="model.hf_folder")
        if hf_checkpoint.is_reward_model_folder(folder):
            return _reward_model(config, folder, mesh, rules)
        ckpt = hf_checkpoint.load(folder, mesh=mesh, rules=rules, **_model_overrides(config))
        return BuiltModel(ckpt.cfg, ckpt.graphdef, ckpt.params, ckpt.tokenizer)
    cfg = models.get_preset(m.preset, **_model_overrides(config))
    graphdef, params = models.init_params(cfg, seed=config.seed, mesh=mesh, rules=rules)
    tokenizer = None
    if config.data.tokenizer:
        tokenizer = load_tokenizer(hub.local_folder(config.data.tokenizer, key="data.tokenizer", weights=False))
        check_fits_model(tokenizer, cfg.vocab_size)
    return BuiltModel(cfg, graphdef, params, tokenizer)


def _reward_model(config: ml_collections.ConfigDict, folder: str, mesh: Mesh, rules: Any) -> BuiltModel:
    """An imported reward model: trained further by a reward-model loss with its own head."""
    if registry.get(config.loss_name).inputs not in REWARD_MODEL_INPUTS:
        raise config_lib.ConfigError(
            f"model.hf_folder={config.model.hf_folder!r} is a reward model (*ForSequenceClassification), which "
            f"loss {config.loss_name!r} cannot tune: start from a causal LM, or use loss_name='bradley_terry' or "
            "'rating_regression'")
    ckpt = hf_checkpoint.load_reward_model(folder, mesh=mesh, rules=rules, **_model_overrides(config))
    labels = config_lib.reward_labels(config)
    if ckpt.head.shape[1] != config.reward.num_labels or (tuple(config.reward.labels) and
                                                          tuple(ckpt.labels) != labels):
        raise config_lib.ConfigError(
            f"model.hf_folder={config.model.hf_folder!r} has a reward head with {ckpt.head.shape[1]} output(s) "
            f"{list(ckpt.labels)}, but reward.num_labels={config.reward.num_labels} and reward.labels="
            f"{list(config.reward.labels)}; set them to match the checkpoint")
    return BuiltModel(ckpt.cfg, ckpt.graphdef, ckpt.params, ckpt.tokenizer, ckpt.head)


def _without_lm_head(cfg: ModelConfig, graphdef: Any, params: Any) -> tuple[ModelConfig, Any, Any]:
    """A reward model's decoder: its head reads hidden states, never the LM head, so an untied
    model's lm_head ([D, V], often the largest matrix) gets no gradient, optimizer state or
    checkpoint space (prefjax.models.hf_layout.reward_model_config)."""
    decoder = hf_layout.reward_model_config(cfg)
    if decoder == cfg:
        return cfg, graphdef, params
    graphdef, _, _ = models.abstract(decoder)
    return decoder, graphdef, {k: v for k, v in params.items() if k != "lm_head"}


def tiling(config: ml_collections.ConfigDict) -> scoring.Tiling:
    """The log-prob tiling keys (logprob_chunk, vocab_chunk, logprob_tile_tokens)."""
    return scoring.Tiling(chunk=config.logprob_chunk, vocab_chunk=config.vocab_chunk,
                          tile_tokens=config.logprob_tile_tokens)


def lora_config(config: ml_collections.ConfigDict) -> Optional[lora_lib.LoraConfig]:
    if not config.lora.enabled:
        return None
    lc = config.lora
    return lora_lib.LoraConfig(rank=lc.rank, alpha=lc.alpha, targets=tuple(lc.targets), rslora=lc.rslora)


def policy_role(config: ml_collections.ConfigDict) -> roles.Policy:
    return roles.Policy(lora=lora_config(config),
                        reward_head=registry.get(config.loss_name).inputs in REWARD_MODEL_INPUTS,
                        reward_labels=config.reward.num_labels)


def reference_role(config: ml_collections.ConfigDict) -> roles.Reference:
    ref = config.reference
    kind = roles.resolve_kind(ref.kind, registry.get(config.loss_name), config.lora.enabled)
    return roles.Reference(kind=kind, refresh=ref.refresh, refresh_every=ref.refresh_every, alpha=ref.alpha,
                           dtype=ref.dtype)


def step_spec(config: ml_collections.ConfigDict, columns: loss_inputs.Columns) -> StepSpec:
    return StepSpec(loss_name=config.loss_name, loss_hparams=config_lib.loss_hparams(config),
                    reference=reference_role(config), policy=policy_role(config), grad_accum=config.grad_accum,
                    columns=columns)


def build(config: ml_collections.ConfigDict, mesh: Mesh, rules: Any, *, columns: loss_inputs.Columns,
          model: Optional[BuiltModel] = None, create_state: bool = True) -> Setup:
    """The run's pieces; `model` is build_model's result when the caller already has it;
    `create_state=False` leaves `state` None (a restore will provide it)."""
    built = build_model(config, mesh, rules) if model is None else model
    cfg, graphdef, params, tokenizer = built.cfg, built.graphdef, built.params, built.tokenizer
    if policy_role(config).reward_head:
        if tokenizer is not None and tokenizer.eos_token_id is None:
            raise config_lib.ConfigError(
                f"the tokenizer of {config.model.hf_folder or config.data.tokenizer!r} has no EOS token: a reward "
                "model reads each response's reward at its final EOS (or end-of-turn) token, so responses must end "
                "with one; use a tokenizer that defines eos_token")
        cfg, graphdef, params = _without_lm_head(cfg, graphdef, params)
    too_long = config_lib.check_length_against_model(config, cfg)
    if too_long:
        log.warning(too_long)
    _, _, axes = models.abstract(cfg)
    spec = step_spec(config, columns)
    tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = models.param_shardings(cfg, mesh, rules)

    trainable, trainable_shardings = spec.policy.init_trainable(
        params, param_shardings, key=jax.random.key(config.seed + 1), mesh=mesh, axes=axes, rules=rules,
        hidden_size=cfg.hidden_size, reward_head=built.reward_head)
    base, base_shardings = spec.policy.fixed(params, param_shardings)
    reference, reference_shardings = spec.reference.fixed(params, param_shardings)
    fixed = roles.Fixed(base=base, reference=reference)
    fixed_shardings = roles.Fixed(base=base_shardings, reference=reference_shardings)

    loss = spec.loss
    loss_state = loss.init_state(**spec.hparams) if loss.stateful else {}
    loss_state = jax.device_put(loss_state, replicated)
    opt_shardings = optim.opt_state_shardings(tx, jax.eval_shape(lambda: trainable), trainable_shardings, mesh)
    state_shardings = TrainState(
        step=replicated, params=trainable_shardings, opt_state=opt_shardings,
        loss_state=jax.tree.map(lambda _: replicated, loss_state), nonfinite_steps=replicated,
        ref_params=param_shardings if spec.reference.moves else None)
    state = None
    if create_state:
        state = TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=trainable,
            opt_state=optim.init_opt_state(tx, trainable, opt_shardings), loss_state=loss_state,
            nonfinite_steps=jax.device_put(jnp.zeros((), jnp.int32), replicated),
            ref_params=spec.reference.initial_moving(params))
    return Setup(scoring.Model(cfg, graphdef, tiling(config)), tokenizer, spec, tx, schedule, state,
                 state_shardings, fixed, fixed_shardings, replicated, params)


def abstract_state(setup: Setup, template: TrainState) -> TrainState:
    """ShapeDtypeStructs with this run's shardings, shaped like `template` (for restores)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), template,
                        setup.state_shardings)
