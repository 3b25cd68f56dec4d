"""The models a preference run holds, as roles: the trained policy and its reference.

One vocabulary for the reference (config key `reference.kind`), one meaning per word:

- "frozen": a separate copy of the policy's initial weights (cast to `reference.dtype`
  when set, e.g. bfloat16), sharded like them, never trained and never checkpointed;
- "lora": the LoRA policy's base weights with the adapters off: no second copy;
- "precomputed": no reference weights in the step at all; one pass before training
  stores the reference's per-response log-probs (prefjax.train.reference_cache) and
  every batch carries them (`Batch.ref_logps`);
- "none": no reference (reference-free losses: SimPO, ORPO, CPO, reward models, SFT);
- "auto" (the default): what the loss needs, "lora" for a LoRA policy and "frozen"
  otherwise when it reads reference log-probs, "none" when it does not, so a
  reference-free loss holds no copy on the device.

`reference.refresh` moves a "frozen" reference during training: "soft" (TR-DPO:
ref <- alpha * policy + (1 - alpha) * ref every `refresh_every` steps) or "hard"
(ref <- policy: the previous iterate). A moving reference lives in the train state
(`TrainState.ref_params`) and is checkpointed, since a resumed run could not rebuild it.

Where each role's weights live:

    TrainState.params      what is trained: {"model": ...} or {"adapters": ...} (LoRA),
                           plus {"reward_head": [D, L]} for reward-model losses
    TrainState.ref_params  a moving reference (refresh "soft" or "hard"), else None
    Fixed.base             the LoRA base (the policy is base + adapters)
    Fixed.reference        the frozen copy

`Fixed` is the step's second argument: read every step, never written, never saved.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from prefjax.losses import registry
from prefjax.models import lora as lora_lib

REFERENCE_KINDS = ("auto", "frozen", "lora", "precomputed", "none")
REFRESH_MODES = ("none", "soft", "hard")
DTYPES = ("", "float32", "bfloat16", "float16")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Fixed:
    """Weights the step reads but never trains or checkpoints (see the module docstring)."""

    base: Any = None
    reference: Any = None


@dataclasses.dataclass(frozen=True)
class Policy:
    """The trained model: full weights, or LoRA adapters on a fixed base; with a reward head
    (a linear head [D, L] on each response's last token, prefjax.scoring) for reward-model losses."""

    lora: Optional[lora_lib.LoraConfig] = None
    reward_head: bool = False
    reward_labels: int = 1  # L, the reward head's outputs

    def params(self, trainable: dict[str, Any], fixed: Fixed) -> Any:
        """The model's params: the trained ones, or the LoRA base with the adapters applied."""
        if self.lora is not None:
            return lora_lib.apply_lora(fixed.base, trainable["adapters"], self.lora)
        return trainable["model"]

    def init_trainable(self, params: Any, param_shardings: Any, *, key: jax.Array, mesh: Mesh, axes: Any,
                       rules: Any, hidden_size: int, reward_head: Optional[Any] = None,
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(what is trained, its shardings) starting from the model's initial `params`.

        Fresh adapters are zero in their B factor, so a LoRA policy starts equal to its base.
        A reward head is `reward_head` when given (an imported reward model's), else fresh:
        N(0, 1 / (D + 1)) per weight (Stiennon et al. 2020, as TRL's reward models), so the
        first rewards are of order 1 and differ between responses from the first step.
        """
        if self.lora is not None:
            trainable = {"adapters": lora_lib.init_lora(params, self.lora, key, mesh=mesh, base_axes=axes,
                                                        rules=rules)}
            shardings = {"adapters": lora_lib.lora_shardings(params, axes, self.lora, mesh, rules)}
        else:
            trainable, shardings = {"model": params}, {"model": param_shardings}
        if self.reward_head:
            replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
            if reward_head is None:
                std = (hidden_size + 1) ** -0.5
                reward_head = std * jax.random.normal(jax.random.fold_in(key, 1), (hidden_size, self.reward_labels))
            trainable["reward_head"] = jax.device_put(jnp.asarray(reward_head, jnp.float32), replicated)
            shardings["reward_head"] = replicated
        return trainable, shardings

    def fixed(self, params: Any, param_shardings: Any) -> tuple[Any, Any]:
        """(Fixed.base, its shardings): the LoRA base, or nothing for a fully trained policy."""
        return (params, param_shardings) if self.lora is not None else (None, None)


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference strategy (module docstring); `kind` is never "auto" here (see `resolve_kind`)."""

    kind: str = "frozen"
    refresh: str = "none"
    refresh_every: int = 1
    alpha: float = 0.5
    dtype: str = ""

    def __post_init__(self) -> None:
        if self.kind not in REFERENCE_KINDS[1:]:
            raise ValueError(f"Reference.kind={self.kind!r}; choose one of {REFERENCE_KINDS[1:]} "
                             "(resolve 'auto' with roles.resolve_kind)")
        if self.refresh not in REFRESH_MODES:
            raise ValueError(f"Reference.refresh={self.refresh!r}; choose one of {REFRESH_MODES}")

    @property
    def moves(self) -> bool:
        """Whether the reference changes during training (and so lives in the train state)."""
        return self.refresh != "none"

    @property
    def runs_in_step(self) -> bool:
        """Whether the step runs the reference model's forward pass."""
        return self.kind in ("frozen", "lora")

    def params(self, ref_params: Any, fixed: Fixed) -> Any:
        """The reference's params inside the step (None when precomputed or absent).

        `ref_params` is TrainState.ref_params (the moving reference, when there is one).
        """
        if self.moves:
            return ref_params
        if self.kind == "frozen":
            return fixed.reference
        if self.kind == "lora":
            return fixed.base  # the base = the policy with its adapters disabled
        return None

    def fixed(self, params: Any, param_shardings: Any) -> tuple[Any, Any]:
        """(Fixed.reference, its shardings): a cast copy of the initial weights for a frozen,
        unmoving reference; nothing otherwise."""
        if self.kind == "frozen" and not self.moves:
            return copy_params(params, self.dtype), param_shardings
        return None, None

    def initial_moving(self, params: Any) -> Any:
        """The moving reference's starting value (a cast copy of the initial weights), or None."""
        return copy_params(params, self.dtype) if self.moves else None

    def refreshed(self, step: jax.Array, policy_params: Any, ref_params: Any) -> Any:
        """TR-DPO: every `refresh_every` steps mix the policy into the reference (soft) or copy it
        (hard); `step` counts updates done, policy_params are the updated policy's."""
        policy = jax.lax.stop_gradient(policy_params)
        due = (step % self.refresh_every) == 0
        if self.refresh == "soft":
            target = jax.tree.map(lambda p, r: (self.alpha * p.astype(jnp.float32)
                                                + (1.0 - self.alpha) * r.astype(jnp.float32)).astype(r.dtype),
                                  policy, ref_params)
        else:
            target = jax.tree.map(lambda p, r: p.astype(r.dtype), policy, ref_params)
        return jax.tree.map(lambda n, o: jnp.where(due, n, o), target, ref_params)


def copy_params(tree: Any, dtype: str = "") -> Any:
    """A copy in new buffers (cast to `dtype` if given), with the same shardings.

    Always a copy: the train step donates the state, and a reference sharing the
    policy's buffers would be freed with it.
    """
    return jax.jit(lambda t: jax.tree.map(lambda x: jnp.copy(x.astype(dtype) if dtype else x), t))(tree)


def reads_reference(loss: registry.LossSpec) -> bool:
    """Whether the loss reads reference log-probs (required or optional fields)."""
    return any(f.startswith("ref_") for f in loss.requires + loss.uses)


def resolve_kind(kind: str, loss: registry.LossSpec, lora: bool) -> str:
    """`reference.kind` with "auto" resolved for this loss and policy (module docstring)."""
    if kind != "auto":
        return kind
    if not reads_reference(loss):
        return "none"
    return "lora" if lora else "frozen"
