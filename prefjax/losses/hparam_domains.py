"""The values a loss hyperparameter may take, each with the reason its formula imposes.

Every registered loss declares a `Domain` for each of its hyperparameters next to its
defaults (`registry.register(..., domains={...})`): a real interval (a temperature that
is divided by, a probability inside a log, a non-negative weight), an integer range, a
flag, a choice among names, or MODPO's weight vector. A domain answers three questions
that error messages need:

  * `problem(value)`: None if the value is allowed, else what is wrong with it ("" when
    the requirement itself says it all, e.g. 0.0 against "beta > 0");
  * `requirement(name)`: the rule in one phrase ("beta > 0", "0 <= eps < 0.5");
  * `hint`: what to set instead ("a positive value").

`why` is the reason, written from the loss's formula ("it divides by it: ...").
The registry turns these into one sentence (`registry.LossHparamError`); the trainer's
config check (prefjax.train.config_lib.check_loss_hparams) prefixes the config key.
Arrays (possibly traced under jit) are not checked: only plain Python/NumPy values.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional, Sequence


def _fmt(x: float) -> str:
    """0.0 -> "0", 0.5 -> "0.5", 1e-3 -> "0.001": bounds as a person writes them."""
    return f"{x:g}"


def _not_a(kind: str, value: Any) -> str:
    """"'abc' is a str, not a number"."""
    type_name = type(value).__name__
    return f"{value!r} is {'an' if type_name[0] in 'aeiou' else 'a'} {type_name}, not {kind}"


def is_number(value: Any) -> bool:
    """A real scalar that is not a bool (True is an int to Python, never a beta to a person)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Domain:
    """Base of the domains below (interface only)."""

    why: str

    def problem(self, value: Any) -> Optional[str]:
        raise NotImplementedError

    def requirement(self, name: str) -> str:
        raise NotImplementedError

    @property
    def hint(self) -> str:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Real(Domain):
    """A finite real number, optionally bounded below and/or above (open or closed bounds)."""

    why: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: Any) -> Optional[str]:
        if not is_number(value):
            return _not_a("a number", value)
        value = float(value)
        if not math.isfinite(value):
            return f"{value!r} is not finite"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return ""
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return ""
        return None

    def requirement(self, name: str) -> str:
        lower = None if self.low is None else f"{_fmt(self.low)} {'<' if self.low_open else '<='} "
        upper = None if self.high is None else f" {'<' if self.high_open else '<='} {_fmt(self.high)}"
        if lower and upper:
            return f"{lower}{name}{upper}"
        if lower:  # "beta > 0" reads better than "0 < beta"
            return f"{name} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        if upper:
            return f"{name}{upper}"
        return f"{name} to be a finite number"

    @property
    def hint(self) -> str:
        if self.low == 0 and self.high is None:
            return "a positive value" if self.low_open else "a non-negative value"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"a value in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"
        if self.low is not None or self.high is not None:
            return f"a value with {self.requirement('it')}"
        return "a finite number"


@dataclasses.dataclass(frozen=True)
class Integer(Domain):
    """An integer >= low (a seed, a count)."""

    why: str
    low: int = 0

    def problem(self, value: Any) -> Optional[str]:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return _not_a("an integer", value)
        return "" if value < self.low else None

    def requirement(self, name: str) -> str:
        return f"{name} to be an integer >= {self.low}"

    @property
    def hint(self) -> str:
        return f"an integer >= {self.low}"


@dataclasses.dataclass(frozen=True)
class Flag(Domain):
    """True or False (a switch of the formula)."""

    why: str

    def problem(self, value: Any) -> Optional[str]:
        # numpy's bool_ is not a bool subclass; 0/1 are refused: a typed config never gives them.
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            return None
        return _not_a("True or False", value)

    def requirement(self, name: str) -> str:
        return f"{name} to be True or False"

    @property
    def hint(self) -> str:
        return "True or False"


@dataclasses.dataclass(frozen=True)
class Choice(Domain):
    """One of a fixed set of names (a variant of the formula)."""

    why: str
    choices: tuple[str, ...] = ()

    def problem(self, value: Any) -> Optional[str]:
        return None if isinstance(value, str) and value in self.choices else ""

    def requirement(self, name: str) -> str:
        return f"{name} to be one of {list(self.choices)}"

    @property
    def hint(self) -> str:
        return "one of them"


@dataclasses.dataclass(frozen=True)
class LeadingPositiveWeights(Domain):
    """A sequence of at least `min_len` finite numbers, the first > 0.

    MODPO's (w_k, w_1, ..., w_M): w_k divides the logit; the others weigh margin rewards, and
    any sign is a valid (if unusual) objective.
    """

    why: str
    min_len: int = 2

    def problem(self, value: Any) -> Optional[str]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return _not_a("a sequence of numbers", value)
        if len(value) < self.min_len:
            return f"it has {len(value)} entr{'y' if len(value) == 1 else 'ies'}"
        bad = [v for v in value if not is_number(v) or not math.isfinite(float(v))]
        if bad:
            return f"{bad[0]!r} is not a finite number"
        if not value[0] > 0:
            return ""
        return None

    def requirement(self, name: str) -> str:
        return (f"{name} = (w_k, w_1, ...) to be at least {self.min_len} finite numbers "
                f"with w_k = {name}[0] > 0")

    @property
    def hint(self) -> str:
        return "e.g. (0.5, 0.5)"


# Constructors, so a registration reads as its rule ("positive(why=...)").

def positive(why: str) -> Real:
    """x > 0 and finite."""
    return Real(why=why, low=0.0, low_open=True)


def non_negative(why: str) -> Real:
    """x >= 0 and finite."""
    return Real(why=why, low=0.0)


def interval(low: float, high: float, *, why: str, low_open: bool = False, high_open: bool = False) -> Real:
    """low <= x <= high, either end open."""
    return Real(why=why, low=low, high=high, low_open=low_open, high_open=high_open)


def any_real(why: str) -> Real:
    """Any finite number (an offset or margin: no bound in the formula)."""
    return Real(why=why)


# Domains several losses share, with the reason in their formulas' terms.
KL_BETA = positive(
    "beta scales the implicit reward beta*rho, the strength of the KL penalty; 0 gives no "
    "gradient and a negative value prefers the rejected response")
DPO_LABEL_SMOOTHING = interval(
    0.0, 0.5, high_open=True,
    why="the assumed rate of flipped labels: at 0.5 the labels carry no preference, above it they "
    "are reversed")
NLL_WEIGHT = non_negative("it weighs a negative log-likelihood term; a negative weight would push "
                          "the response's likelihood down")
