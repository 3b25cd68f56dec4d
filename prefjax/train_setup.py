"""Everything a run builds before its first step: model, reference, optimizer, state, shardings.

Parameters are created (or imported from a Hugging Face folder) directly in
their shards; the optimizer state is initialised under jit into shardings
derived from the parameters'; the frozen reference is a cast copy with the
same shardings (or, for LoRA, the base model itself). `abstract_state` gives
the state's shapes and shardings without creating it, which is what an orbax
restore onto this run's mesh needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefjax import config_lib, loss_inputs, models, optim, steps
from prefjax.losses import registry
from prefjax.models import hf_checkpoint
from prefjax.models import lora as lora_lib
from prefjax.models.config import ModelConfig
from prefjax.models.tokenizer import Tokenizer, check_fits_model, load_tokenizer
from prefjax.state import TrainState


@dataclasses.dataclass
class Setup:
    """The static pieces of a run and its initial (or abstract) state."""

    model_cfg: ModelConfig
    graphdef: nnx.GraphDef
    tokenizer: Optional[Tokenizer]
    spec: steps.StepSpec
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state: Optional[TrainState]
    state_shardings: Any
    frozen: Any
    frozen_shardings: Any
    replicated: NamedSharding
    initial_params: Any  # the policy's starting model params (the frozen base for LoRA)


def _model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    m = config.model
    return dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, attention_impl=m.attention_impl,
                attention_block_size=m.attention_block_size or None)


def build_model(config: ml_collections.ConfigDict, mesh: Mesh, rules: Any,
                ) -> tuple[ModelConfig, nnx.GraphDef, Any, Optional[Tokenizer]]:
    """(model config, graphdef, sharded params, tokenizer) from a preset or a Hugging Face folder."""
    m = config.model
    if m.hf_folder:
        ckpt = hf_checkpoint.load(m.hf_folder, mesh=mesh, rules=rules, **_model_overrides(config))
        return ckpt.cfg, ckpt.graphdef, ckpt.params, ckpt.tokenizer
    cfg = models.get_preset(m.preset, **_model_overrides(config))
    graphdef, params = models.init_params(cfg, seed=config.seed, mesh=mesh, rules=rules)
    tokenizer = None
    if config.data.tokenizer:
        tokenizer = load_tokenizer(config.data.tokenizer)
        check_fits_model(tokenizer, cfg.vocab_size)
    return cfg, graphdef, params, tokenizer


def lora_config(config: ml_collections.ConfigDict) -> Optional[lora_lib.LoraConfig]:
    if not config.lora.enabled:
        return None
    lc = config.lora
    return lora_lib.LoraConfig(rank=lc.rank, alpha=lc.alpha, targets=tuple(lc.targets), rslora=lc.rslora)


def step_spec(config: ml_collections.ConfigDict, columns: loss_inputs.Columns, num_responses: int,
              packed: bool, shared_prefix: bool = False) -> steps.StepSpec:
    ref = config.reference
    return steps.StepSpec(
        loss_name=config.loss_name, loss_hparams=config_lib.loss_hparams(config), num_responses=num_responses,
        packed=packed and not shared_prefix, shared_prefix=shared_prefix, grad_accum=config.grad_accum, reference=ref.kind, ref_update=ref.refresh,
        ref_update_every=ref.refresh_every, ref_alpha=ref.alpha, columns=columns,
        logprob_chunk=config.logprob_chunk, vocab_chunk=config.vocab_chunk,
        logprob_tile_tokens=config.logprob_tile_tokens, lora=lora_config(config))


def _copy(tree: Any, dtype: str) -> Any:
    """A copy in new buffers (cast to `dtype` if given), with the same shardings.

    Always a copy: the train step donates the state, and a reference sharing the
    policy's buffers would be freed with it.
    """
    return jax.jit(lambda t: jax.tree.map(lambda x: jnp.copy(x.astype(dtype) if dtype else x), t))(tree)


def build(config: ml_collections.ConfigDict, mesh: Mesh, rules: Any, *, columns: loss_inputs.Columns,
          num_responses: int, packed: bool, model: Optional[tuple] = None, create_state: bool = True,
          shared_prefix: bool = False) -> Setup:
    """The run's pieces; `model` is build_model's result when the caller already has it;
    `create_state=False` leaves `state` None (a restore will provide it)."""
    cfg, graphdef, params, tokenizer = build_model(config, mesh, rules) if model is None else model
    _, _, axes = models.abstract(cfg)
    spec = step_spec(config, columns, num_responses, packed, shared_prefix)
    tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = models.param_shardings(cfg, mesh, rules)

    # What is trained, and its shardings.
    if spec.lora is not None:
        trainable = {"adapters": lora_lib.init_lora(params, spec.lora, jax.random.key(config.seed + 1), mesh=mesh,
                                                    base_axes=axes, rules=rules)}
        trainable_shardings = {"adapters": lora_lib.lora_shardings(params, axes, spec.lora, mesh, rules)}
    else:
        trainable = {"model": params}
        trainable_shardings = {"model": param_shardings}
    if spec.reward_model:
        trainable["reward_head"] = jax.device_put(jnp.zeros((cfg.hidden_size,), jnp.float32), replicated)
        trainable_shardings["reward_head"] = replicated

    # The reference: a cast copy (frozen), the LoRA base, or nothing.
    frozen, frozen_shardings = None, None
    if spec.lora is not None:
        frozen, frozen_shardings = params, param_shardings
    elif spec.reference == "frozen" and spec.ref_update == "none":
        frozen, frozen_shardings = _copy(params, config.reference.dtype), param_shardings

    loss = registry.get(config.loss_name)
    loss_state = loss.init_state(**spec.hparams) if loss.stateful else {}
    loss_state = jax.device_put(loss_state, replicated)
    moving_ref = spec.ref_update != "none"
    opt_shardings = optim.opt_state_shardings(tx, jax.eval_shape(lambda: trainable), trainable_shardings, mesh)
    state_shardings = TrainState(
        step=replicated, params=trainable_shardings, opt_state=opt_shardings,
        loss_state=jax.tree.map(lambda _: replicated, loss_state), nonfinite_steps=replicated,
        ref_params=param_shardings if moving_ref else None)
    state = None
    if create_state:
        state = TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=trainable,
            opt_state=optim.init_opt_state(tx, trainable, opt_shardings), loss_state=loss_state,
            nonfinite_steps=jax.device_put(jnp.zeros((), jnp.int32), replicated),
            ref_params=_copy(params, config.reference.dtype) if moving_ref else None)
    return Setup(cfg, graphdef, tokenizer, spec, tx, schedule, state, state_shardings, frozen, frozen_shardings,
                 replicated, params)


def abstract_state(setup: Setup, template: TrainState) -> TrainState:
    """ShapeDtypeStructs with this run's shardings, shaped like `template` (for restores)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), template,
                        setup.state_shardings)
