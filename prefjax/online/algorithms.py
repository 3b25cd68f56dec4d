"""The online and iterative algorithms: what each samples, how it labels, what it trains.

Each algorithm is one row of ALGORITHMS; the batch source (prefjax.online.source) reads
the row and the loss comes from the registry like any other:

| name          | paper                         | samples per prompt                 | labels                          | loss             | reference (paper) |
|---------------|-------------------------------|------------------------------------|---------------------------------|------------------|-------------------|
| online_dpo    | Guo et al. 2024               | K from the policy                  | best vs worst (or random pair)  | any pair loss    | initial           |
| iterative_dpo | Xiong et al.; Dong et al. 2024| K from pi_t, at each round's start | best vs worst by reward         | any pair loss    | previous iterate  |
| xpo           | Xie et al. 2024               | 1 from the policy, 1 from pi_ref   | the better of the two           | xpo              | initial           |
| nash_md       | Munos et al. 2023             | 1 from the policy, 1 from the      | p = P(y > y') on the policy's   | nash_md          | initial           |
|               |                               | token-level mixture of pi and pi_ref | sample                        |                  |                   |
| sppo          | Wu et al. 2024                | K from pi_t                        | win rates P(y_k > the others);  | sppo, sppo_hard  | previous iterate  |
|               |                               |                                    | highest vs lowest               |                  |                   |
| inpo          | Zhang et al. 2024             | 2 from pi_t                        | the preferred one (P > 1/2)     | inpo             | initial, and pi_t |
| hypo          | Song et al. 2024              | 1 from the policy for each offline | the offline pair's own label;   | hypo             | initial           |
|               |                               | pair's prompt (data.source)        | no reward needed                |                  |                   |

"reference" is what `online.reference="auto"` picks: "initial" scores the samples with the
starting weights when they are drawn; "previous iterate" uses the sampler's own log-probs,
log pi_t(y), so no reference weights are held at all. INPO reads both (pi_t through
Batch.sampler_logps). Rejection sampling / West-of-N is online_dpo (or iterative_dpo) with
K = N samples and pairs="best_worst".
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from prefjax.losses import registry, types

# What a pair loss may read in an online batch (token-level losses need the reference in the step).
_PAIR_COLUMNS = frozenset({"ref_chosen", "ref_rejected", "chosen_len", "rejected_len", "score_chosen",
                           "score_rejected"})


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One row of the table in the module docstring."""

    name: str
    paper: str
    default_loss: str
    draws: str  # "policy": K samples; "policy+reference": XPO; "policy+mixture": Nash-MD
    # "pairs": best/worst or random by reward; "win_rates": SPPO; "preference": INPO, Nash-MD;
    # "offline": data.source's pairs, each with a fresh policy sample (HyPO)
    labels: str
    reference: str  # the paper's reference: "initial" or "previous_iterate"
    losses: Optional[tuple[str, ...]] = None  # the losses it runs (None: any pair loss an online batch feeds)
    samples: Optional[int] = None  # samples per prompt it needs (None: online.samples_per_prompt, >= 2)
    needs_previous_iterate: bool = False  # reads log pi_t besides the reference (INPO)

    @property
    def offline(self) -> bool:
        """Whether its pairs come from data.source (its samples only estimate a KL term)."""
        return self.labels == "offline"

    def check_loss(self, loss_name: str) -> Optional[str]:
        """Why `loss_name` cannot train on this algorithm's batches (None when it can)."""
        if self.losses is not None:
            if loss_name not in self.losses:
                return f"online.algorithm={self.name!r} trains with loss_name in {list(self.losses)}"
            return None
        spec = registry.get(loss_name)
        if spec.inputs is not types.PairLogps:
            return (f"online.algorithm={self.name!r} builds preference pairs; loss {loss_name!r} reads "
                    f"{spec.data_shape} data")
        extra = sorted(set(spec.requires) - _PAIR_COLUMNS)
        if extra:
            return (f"loss {loss_name!r} reads {extra}, which online batches do not carry (they hold the "
                    "sequence log-probs, lengths and rewards of each pair)")
        return None


ALGORITHMS = {a.name: a for a in (
    Algorithm("online_dpo", "Guo et al. 2024, Direct language model alignment from online AI feedback", "dpo",
              draws="policy", labels="pairs", reference="initial"),
    Algorithm("iterative_dpo", "Xiong et al. 2024; Dong et al. 2024, RLHF Workflow", "dpo",
              draws="policy", labels="pairs", reference="previous_iterate"),
    Algorithm("xpo", "Xie et al. 2024, Exploratory Preference Optimization", "xpo",
              draws="policy+reference", labels="pairs", reference="initial", losses=("xpo",), samples=2),
    Algorithm("nash_md", "Munos et al. 2023, Nash Learning from Human Feedback", "nash_md",
              draws="policy+mixture", labels="preference", reference="initial", losses=("nash_md",), samples=2),
    Algorithm("sppo", "Wu et al. 2024, Self-Play Preference Optimization", "sppo",
              draws="policy", labels="win_rates", reference="previous_iterate", losses=("sppo", "sppo_hard")),
    Algorithm("inpo", "Zhang et al. 2024, Iterative Nash Policy Optimization", "inpo",
              draws="policy", labels="preference", reference="initial", losses=("inpo",), samples=2,
              needs_previous_iterate=True),
    Algorithm("hypo", "Song et al. 2024, The Importance of Online Data (HyPO)", "hypo",
              draws="policy", labels="offline", reference="initial", losses=("hypo",), samples=1),
)}


def get(name: str) -> Algorithm:
    """The algorithm called `name`; an unknown name is a ValueError listing the others."""
    if name not in ALGORITHMS:
        raise ValueError(f"online.algorithm={name!r} is not one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
