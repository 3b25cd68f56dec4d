"""The train state: everything a run must checkpoint to resume exactly, and nothing more.

`params` holds only what is trained: {"model": full params} or, for LoRA runs,
{"adapters": ...}; a reward-model loss adds {"reward_head": [D]}. The frozen
reference and the LoRA base (prefjax.roles.Fixed) are not in the state and never
enter a checkpoint: they are rebuilt from the run's initial weights. The one exception
is a reference that moves during training (TR-DPO soft/hard updates, previous
iterate), which lives in `ref_params` because a resumed run could not rebuild it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: Array  # int32 scalar: optimizer steps taken
    params: dict[str, Any]
    opt_state: Any
    loss_state: Any  # a stateful loss's carried state (beta-DPO, BCO); {} otherwise
    nonfinite_steps: Array  # int32 scalar: steps whose update was skipped for a NaN/Inf
    ref_params: Optional[Any] = None  # only for references that move (TR-DPO)
