"""prefjax's loss library: every preference loss as a small pure function.

    from prefjax import losses
    spec = losses.get("dpo")
    out = spec(losses.PairLogps(chosen=..., rejected=..., ref_chosen=..., ref_rejected=...), beta=0.1)
    out.losses      # [B] per-example losses
    out.metrics     # {"rewards/chosen": [B], ...}

Importing this package registers every loss (each submodule registers its own).
"""

# Submodules register their losses on import.
from prefjax.losses import (  # noqa: F401  (imported for registration)
    beta_dpo,
    fdpo,
    listwise,
    margins,
    online,
    pairwise,
    reference_free,
    reward_model,
    sft,
    token_level,
    unpaired,
)
from prefjax.losses.reduction import weighted_sum_and_count
from prefjax.losses.registry import LossHparamError, LossInputError, LossSpec, get, names, register
from prefjax.losses.types import (
    ListLogps,
    LossOutput,
    PairLogps,
    RatedResponses,
    RewardPair,
    UnpairedLogps,
)

__all__ = [
    "ListLogps",
    "LossHparamError",
    "LossInputError",
    "LossOutput",
    "LossSpec",
    "PairLogps",
    "RatedResponses",
    "RewardPair",
    "UnpairedLogps",
    "get",
    "names",
    "register",
    "weighted_sum_and_count",
]
