"""The reward-KL frontier of several losses on the quick-start task (the DPO paper's figure 2, small).

    python -m prefjax.quickstart.frontier --workdir=/tmp/frontier         # in one process, plot + table
    python -m prefjax.quickstart.frontier --workdir=/tmp/frontier --small # a 2-minute version

Every run starts from the same SFT model and West-of-N pairs (configs/quickstart.py's
stages 1-3) and differs only in the loss and its beta; each lands at one (KL, reward)
point, and the points of one loss, joined across beta, trace its frontier. A lower beta
lets the policy drift further from the SFT reference. The plot adds best-of-n sampling
from the SFT policy as a baseline. For IPO, beta is tau (target margin 1 / (2 tau)); for
SimPO it scales the length-normalised log-likelihood (no reference: its KL is what it
drifts to); robust DPO keeps its default 10% assumed flip rate.

With launch/sweep.py each run is a separate process that would redo SFT; share one by
running the quick start first and passing its workdir:
    python -m prefjax.main --config=configs/quickstart.py --workdir=/tmp/qs
    python -m launch.sweep --config=configs/quickstart_frontier.py --workdir=/tmp/frontier \\
        -- --config.reuse=/tmp/qs
    python -m launch.collect /tmp/frontier --metrics=eval/reward,eval/kl,eval/win_rate
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import ml_collections

from prefjax.quickstart import grid

# beta values per loss, from close to the reference (large beta) to far from it.
GRID = {
    "dpo": (1.0, 0.3, 0.1, 0.03),
    "ipo": (1.0, 0.3, 0.1, 0.03),
    "robust_dpo": (1.0, 0.3, 0.1, 0.03),
    "kto": (1.0, 0.3, 0.1, 0.03),
    "simpo": (4.0, 2.0, 1.0, 0.5),
}


def _quickstart() -> Any:
    """configs/quickstart.py, loaded by path (configs/ is not a package)."""
    return grid.load_module(Path(__file__).with_name("quickstart.py"))


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """The quick-start config (arg "small" shrinks it), the base of every run."""
    return _quickstart().get_config(arg)


def sweep(add: Callable[..., None]) -> None:
    for loss_name, betas in GRID.items():
        for beta in betas:
            add(loss_name=loss_name, loss__beta=beta)
