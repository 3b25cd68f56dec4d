"""Offline DPO on West-of-N pairs vs online and iterative methods, at an equal budget of reward calls.

    python -m prefjax.quickstart.online --workdir=/tmp/online-exp                 # seed 0
    python -m prefjax.quickstart.online --workdir=/tmp/online-exp --seeds=0,1,2
    python -m prefjax.quickstart.online --workdir=/tmp/online-exp --small         # ~2 min, sentiment

The quick start's task, SFT model and West-of-N pairs (stages 1-3), with 2,112 West-of-N
prompts instead of 2,048 so that the label budget, 2,112 x 8 = 16,896 reward calls, splits
exactly into 3 equal rounds of iterative DPO (3 x 704 prompts x 8 samples) and into whole
steps of every other method (prefjax.quickstart.online.plan has the arithmetic):

    offline DPO    2,112 prompts x 8 samples, best vs worst, 400 steps of 64 pairs (the quick start)
    online DPO     264 steps x 32 prompts x 2 fresh policy samples              = 16,896
    iterative DPO  3 rounds x 704 prompts x 8 samples, 12 epochs of 64 a round   = 16,896 (396 steps)
    XPO            264 steps x 32 prompts x (1 policy + 1 reference sample)     = 16,896
    Nash-MD        264 steps x 32 prompts x (1 policy + 1 mixture sample)       = 16,896
    SPPO           132 steps x 32 prompts x 4 policy samples                    = 16,896

Every method starts from the SFT model, uses the quick start's optimiser (tune.learning_rate,
tune.warmup_steps) and its algorithm's loss with the paper settings of configs/online.py.
"online.batch_size" is the prompts per step of the per-step methods; iterative DPO trains
on tune.batch_size pairs per step, as the offline run does, for `iterative_epochs` passes
per round (12: about the offline run's 400 steps in all).

":small" is the shrunken quick start (the sentiment task, 192 West-of-N prompts: a budget of
1,536 calls), for the tests and the notebook.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import ml_collections

from prefjax.quickstart import grid

METHODS = ("offline_dpo", "online_dpo", "iterative_dpo", "xpo", "nash_md", "sppo")


def _quickstart() -> Any:
    """configs/quickstart.py, loaded by path (configs/ is not a package)."""
    return grid.load_module(Path(__file__).with_name("quickstart.py"))


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """The quick-start config plus the comparison's settings; arg "small" shrinks both."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    if any(p != "small" for p in parts):
        raise KeyError(f"the config argument may only be 'small', got {arg!r}")
    small = "small" in parts
    config = _quickstart().get_config("small" if small else None)
    # 2,112 = 3 x 704 = 33 x 64: the budget splits into 3 rounds of whole batches (module docstring).
    config.west_of_n.prompts = 2112
    config.online_experiment = dict(
        methods=METHODS,
        batch_size=32,  # prompts per step of the per-step online methods (online DPO, XPO, Nash-MD, SPPO)
        iterative_rounds=3,
        iterative_epochs=12,  # passes over each round's pairs (3 x 11 x 12 = 396 steps vs the offline 400)
        sppo_samples=4,  # K for SPPO's win rates (configs/online.py's value)
    )
    if small:
        config.west_of_n.prompts = 192  # 3 rounds x 64 prompts x 8 samples = 1,536 calls
        # online DPO, XPO, Nash-MD: 48 steps of 16 x 2; SPPO: 24 steps of 16 x 4; iterative DPO: 3 rounds of
        # 64 prompts x 8, 5 epochs of 2 steps of 32 (30 steps, as the small offline run).
        config.online_experiment.update(batch_size=16, iterative_epochs=5)
    return config
