"""A small sweep over loss x beta on configs/tiny_dpo.py (CPU, synthetic data, no downloads).

    python -m launch.sweep --config=configs/sweep_tiny_dpo.py --workdir=/tmp/sweep-tiny
    python -m launch.collect /tmp/sweep-tiny --plot_x=loss.beta --plot_metric=final/loss

Four runs of tiny_dpo (20 steps each, ~20 s apiece on 2 CPU cores): DPO and IPO, each at
beta 0.1 and 0.5; each run's workdir is named after its overrides
(`loss_name=dpo,loss.beta=0.1`), and rerunning the sweep skips the finished ones.
Measured on 2 CPU cores (the collector's table; IPO's loss is a squared error, so its
values are not comparable with DPO's):

    loss_name  loss.beta  final/loss  final/rewards/accuracies  final/rewards/margins
    dpo        0.1        0.002388    1                         6.422
    dpo        0.5        3.203e-08   1                         27.52
    ipo        0.1        7.416       0.875                     0.4648
    ipo        0.5        29.27       0.625                     1.43

`python -m prefjax.main --config=configs/sweep_tiny_dpo.py` runs the base config (DPO,
beta 0.1) alone.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import ml_collections

LOSSES = ("dpo", "ipo")
BETAS = (0.1, 0.5)


def _tiny_dpo():
    # Config files are loaded by path, not as a package: import the sibling the same way.
    spec = importlib.util.spec_from_file_location("_prefjax_tiny_dpo", Path(__file__).with_name("tiny_dpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(loss_name: str | None = None) -> ml_collections.ConfigDict:
    config = _tiny_dpo().get_config(loss_name)
    # The config is locked on the command line: a swept key must exist in it already.
    # Both swept losses take beta (the paper default is 0.1 for each).
    if "beta" not in config.loss:
        config.loss.beta = 0.1
    return config


def sweep(add: Callable[..., None]) -> None:
    for loss_name in LOSSES:
        for beta in BETAS:
            add(loss_name=loss_name, loss__beta=beta)
