"""Label noise on the quick-start task: DPO, cDPO and robust DPO with 20% and 40% of pairs flipped.

    python -m prefjax.quickstart.label_noise --workdir=/tmp/label-noise            # table + plot
    python -m prefjax.quickstart.label_noise --workdir=/tmp/label-noise --seeds=0,1,2

The West-of-N pairs are exact (best vs worst by a verifiable reward), so flipping an exact
fraction eps of them (config.tune.label_noise: each run trains on a copy of the pairs with
round(eps * N) of them swapped, the same pairs for every method at one seed) gives data with
a known flip rate. Each method is told the true eps: cDPO is DPO with label_smoothing = eps
(the conservative DPO of Mitchell 2023), robust DPO (Chowdhury et al. 2024) uses its
unbiased loss with label_smoothing = eps. The robust DPO paper's claim: its loss is an
unbiased estimate of the clean DPO loss, so its policy should lose less ground-truth reward
to the flips than DPO or cDPO. Clean DPO (eps = 0) is the reference row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import ml_collections

from prefjax.quickstart import grid

NOISE = (0.2, 0.4)
# method -> (loss_name, whether label_smoothing is set to the flip rate)
METHODS = {"DPO": ("dpo", False), "cDPO": ("dpo", True), "robust DPO": ("robust_dpo", True)}


def _quickstart() -> Any:
    """configs/quickstart.py, loaded by path (configs/ is not a package)."""
    return grid.load_module(Path(__file__).with_name("quickstart.py"))


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """The quick-start config with label_smoothing as a key (arg "small" shrinks it)."""
    config = _quickstart().get_config(arg)
    config.loss = dict(beta=0.1, label_smoothing=0.0)
    # Four times the quick start's pairs (about 7,600; 400 steps of 64 are ~3 passes), so a policy
    # learns the preferences across pairs rather than memorising each flipped one.
    config.west_of_n.prompts *= 4
    return config


def sweep(add: Callable[..., None]) -> None:
    add(loss_name="dpo", loss__label_smoothing=0.0, tune__label_noise=0.0)
    for eps in NOISE:
        for loss_name, smoothed in METHODS.values():
            add(loss_name=loss_name, loss__label_smoothing=eps if smoothed else 0.0, tune__label_noise=eps)
