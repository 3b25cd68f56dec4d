"""The loss registry: losses found by name, each declaring what it needs.

A loss is a pure function registered with `register`:

    @register("ipo", inputs=PairLogps, requires=REFERENCE_PAIR,
              paper="...", equation="(h - 1/(2 beta))^2",
              domains={"beta": hparam_domains.positive("it divides by it: ...")})
    def ipo(lp: PairLogps, *, beta: float = 0.1) -> LossOutput: ...

Stateless losses take ``(inputs, **hparams)``; stateful ones (``init_state``
given) take ``(inputs, state, **hparams)`` and return the new state in
`LossOutput.state`. Hyperparameters are keyword-only with the paper's
defaults, and each declares the values its formula admits (`domains`, see
prefjax.losses.hparam_domains; registration refuses a default outside it).
`LossSpec.__call__` checks the hyperparameters' names and (plain, not array)
values, and the inputs (at trace time: shapes and presence, never values)
before calling the function, so a missing field or a beta of 0 fails with the
loss's name and the field's or key's name rather than deep inside jnp.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.losses import types
from prefjax.losses.hparam_domains import Domain

LossFn = Callable[..., types.LossOutput]

# Field groups that many losses require, named for readability at call sites.
REFERENCE_PAIR = ("ref_chosen", "ref_rejected")
LENGTH_PAIR = ("chosen_len", "rejected_len")

# How each input container is described in error messages and the README.
DATA_SHAPES = {
    types.PairLogps: "pairs",
    types.UnpairedLogps: "unpaired",
    types.ListLogps: "ranked lists",
    types.RewardPair: "pairs (reward model)",
    types.RatedResponses: "ratings (reward model)",
}

# What each input field means to a caller that must produce it (see LossSpec.needs).
_FIELD_NEEDS = {
    "ref_chosen": "reference logps",
    "ref_rejected": "reference logps",
    "ref_logps": "reference logps",
    "ref_kl_logps": "reference logps",
    "chosen_len": "lengths",
    "rejected_len": "lengths",
    "length": "lengths",
    "lengths": "lengths",
    "gold_len": "lengths",
    "chosen_token_logps": "token logps",
    "rejected_token_logps": "token logps",
    "chosen_token_kl": "token kl",
    "rejected_token_kl": "token kl",
    "chosen_mask": "token masks",
    "rejected_mask": "token masks",
    "score_chosen": "scores",
    "score_rejected": "scores",
    "scores": "scores",
    "margin": "margins",
    "gold": "gold response",
    "kl_logps": "mismatched pairs",
    "weight": "weights",
    "mask": "list masks",
    # Online losses (prefjax.losses.online): columns an online batch carries.
    "prev_chosen": "previous-iterate logps",
    "prev_rejected": "previous-iterate logps",
    "chosen_from_reference": "response origins",
    "rejected_from_reference": "response origins",
    "sample": "a policy sample",
    "ref_sample": "a policy sample",
    "score": "scores",
}

# Fields whose trailing axes are not just [B]: name -> number of axes.
_FIELD_NDIM = {
    "chosen_token_logps": 2,
    "rejected_token_logps": 2,
    "chosen_token_kl": 2,
    "rejected_token_kl": 2,
    "chosen_mask": 2,
    "rejected_mask": 2,
}
_LIST_FIELDS = ("logps", "scores", "ref_logps", "lengths", "mask")
_RATING_FIELDS = ("predicted", "target", "mask")
_MULTI_COLUMN_FIELDS = ("score_chosen", "score_rejected")  # [B] or [B, M]


class LossInputError(ValueError):
    """Inputs that a loss cannot use: a missing field or a wrong shape."""


class LossHparamError(ValueError):
    """A hyperparameter value outside its declared domain.

    `str(err)` is "beta=0.0: loss 'ipo' needs beta > 0 (why); set a positive value";
    `hparam`, `value` and `reason` (the part after the colon) let a caller name the
    key its own way (config_lib: "config.loss.beta=0.0: ...").
    """

    def __init__(self, hparam: str, value: Any, reason: str):
        super().__init__(f"{hparam}={value!r}: {reason}")
        self.hparam, self.value, self.reason = hparam, value, reason


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A registered loss and its declared needs.

    Attributes:
      name: registry name.
      fn: the pure loss function.
      inputs: the input container class it takes (`types.PairLogps`, ...).
      requires: input fields that must be present (not None).
      uses: optional input fields the loss reads when present.
      paper: the paper the objective comes from.
      equation: the objective in one line, in the library's notation.
      init_state: for stateful losses, ``init_state(**hparams)`` returns the
        state before the first step; None for stateless losses.
      domains: (name, Domain) for every hyperparameter: the values it may take and why.
    """

    name: str
    fn: LossFn
    inputs: type
    requires: tuple[str, ...]
    uses: tuple[str, ...]
    paper: str
    equation: str
    init_state: Optional[Callable[..., Any]] = None
    domains: tuple[tuple[str, Domain], ...] = ()

    @property
    def stateful(self) -> bool:
        return self.init_state is not None

    @property
    def needs_reference(self) -> bool:
        return any(f.startswith("ref_") for f in self.requires)

    @property
    def needs(self) -> frozenset[str]:
        """What a caller must supply beyond policy log-probs, in words.

        From the required fields: "reference logps", "lengths", "token logps",
        "token kl", "token masks", "scores", "margins", "gold response",
        "mismatched pairs" (KTO's KL estimate), and for online losses "previous-iterate
        logps", "response origins", "a policy sample"; plus "ranked lists" for K-response
        inputs and "state" for stateful losses. Optional fields (`uses`) are not
        needs: the loss works without them.
        """
        needs = {_FIELD_NEEDS[f] for f in self.requires if f in _FIELD_NEEDS}
        if self.inputs is types.ListLogps:
            needs.add("ranked lists")
        if self.stateful:
            needs.add("state")
        return frozenset(needs)

    @property
    def data_shape(self) -> str:
        return DATA_SHAPES[self.inputs]

    @property
    def hparam_defaults(self) -> dict[str, Any]:
        """Keyword-only hyperparameters and their (paper) defaults."""
        return {
            p.name: p.default
            for p in inspect.signature(self.fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def check_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Raises TypeError naming unknown hyperparameters and the valid ones."""
        allowed = self.hparam_defaults
        unknown = sorted(set(hparams) - set(allowed))
        if unknown:
            raise TypeError(
                f"loss {self.name!r} has no hyperparameter(s) {unknown}; "
                f"its hyperparameters are {sorted(allowed)} "
                f"(defaults: {allowed})"
            )

    @property
    def hparam_domains(self) -> dict[str, Domain]:
        """Each hyperparameter's declared domain (see prefjax.losses.hparam_domains)."""
        return dict(self.domains)

    def hparam_problem(self, name: str, value: Any) -> Optional[str]:
        """None if `value` is allowed for hyperparameter `name`, else the reason, e.g. "loss 'ipo'
        needs beta > 0 (it divides by it: ...); set a positive value". Arrays are not checked."""
        domain = self.hparam_domains.get(name)
        # Unknown names are check_hparams' job; arrays (maybe traced) would need a device sync.
        if domain is None or isinstance(value, (jax.Array, np.ndarray)):
            return None
        problem = domain.problem(value)
        if problem is None:
            return None
        return (f"loss {self.name!r} needs {domain.requirement(name)} ({domain.why})"
                f"{'; ' + problem if problem else ''}; set {domain.hint}")

    def check_hparam_values(self, hparams: Mapping[str, Any]) -> None:
        """Raises LossHparamError for the first value outside its hyperparameter's domain."""
        for name, value in hparams.items():
            reason = self.hparam_problem(name, value)
            if reason is not None:
                raise LossHparamError(name, value, reason)

    def check_inputs(self, inputs: Any) -> None:
        """Raises LossInputError if `inputs` lacks a field or has a bad shape."""
        if not isinstance(inputs, self.inputs):
            raise LossInputError(
                f"loss {self.name!r} takes {self.inputs.__name__} "
                f"({self.data_shape}), got {type(inputs).__name__}"
            )
        for field in self.requires:
            if getattr(inputs, field) is None:
                raise LossInputError(
                    f"loss {self.name!r} needs field {field!r} of "
                    f"{self.inputs.__name__}, but it is None"
                )
        _check_shapes(self.name, inputs)

    def __call__(self, inputs: Any, state: Any = None, **hparams: Any) -> types.LossOutput:
        """Checks inputs and hyperparameters, then calls the loss."""
        self.check_hparams(hparams)
        self.check_hparam_values(hparams)
        self.check_inputs(inputs)
        if self.stateful:
            if state is None:
                raise LossInputError(
                    f"loss {self.name!r} is stateful: pass state= "
                    f"(start from spec.init_state(**hparams))"
                )
            return self.fn(inputs, state, **hparams)
        if state is not None:
            raise LossInputError(f"loss {self.name!r} keeps no state, got state={state!r}")
        return self.fn(inputs, **hparams)


def _check_shapes(loss_name: str, inputs: Any) -> None:
    """Leading axes agree; token fields are [B, T]; list fields are [B, K]."""
    present = {
        f.name: getattr(inputs, f.name)
        for f in dataclasses.fields(inputs)
        if getattr(inputs, f.name) is not None
    }
    first_name, first = next(iter(present.items()))
    if jnp.ndim(first) < 1:
        raise LossInputError(
            f"loss {loss_name!r}: field {first_name!r} must have a batch axis, "
            f"got shape {jnp.shape(first)}"
        )
    batch = jnp.shape(first)[0]
    trailing_by_group: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, value in present.items():
        shape = jnp.shape(value)
        if isinstance(inputs, types.ListLogps) and name in _LIST_FIELDS:
            ndim, group = 2, "list"
        elif isinstance(inputs, types.RatedResponses) and name in _RATING_FIELDS:
            ndim, group = 2, "ratings"
        elif name in _FIELD_NDIM:
            ndim, group = _FIELD_NDIM[name], name.split("_")[0] + "_tokens"
        elif name in _MULTI_COLUMN_FIELDS:
            ndim, group = (1 if len(shape) == 1 else 2), "scores"
        else:
            ndim, group = 1, "batch"
        if len(shape) != ndim or shape[0] != batch:
            want = "[B]" if ndim == 1 else "[B, n]"
            raise LossInputError(
                f"loss {loss_name!r}: field {name!r} must have shape {want} with "
                f"B={batch} (from field {first_name!r}), got {shape}"
            )
        if ndim == 2:
            seen = trailing_by_group.get(group)
            if seen is not None and seen[0] != shape[1:]:
                raise LossInputError(
                    f"loss {loss_name!r}: field {name!r} has shape {shape}, but "
                    f"field {seen[1]!r} has trailing shape {seen[0]}; they must match"
                )
            trailing_by_group.setdefault(group, (shape[1:], name))


_REGISTRY: dict[str, LossSpec] = {}


def register(
    name: str,
    *,
    inputs: type,
    requires: tuple[str, ...] = (),
    uses: tuple[str, ...] = (),
    paper: str,
    equation: str,
    init_state: Optional[Callable[..., Any]] = None,
    domains: Optional[Mapping[str, Domain]] = None,
) -> Callable[[LossFn], LossFn]:
    """Decorator that registers a loss under `name`; a duplicate name raises.

    `domains` maps each keyword-only hyperparameter to its `Domain` (every loss of
    this library declares one for each; a throwaway loss may leave some out, and
    their values go unchecked); a domain for no hyperparameter, or a default outside
    its domain, raises TypeError here, at import.
    """
    domains = dict(domains or {})
    if inputs not in DATA_SHAPES:
        raise TypeError(f"loss {name!r}: unknown input container {inputs!r}")
    field_names = {f.name for f in dataclasses.fields(inputs)}
    bad = sorted((set(requires) | set(uses)) - field_names)
    if bad:
        raise TypeError(f"loss {name!r}: {inputs.__name__} has no field(s) {bad}")

    def decorate(fn: LossFn) -> LossFn:
        if name in _REGISTRY:
            raise ValueError(
                f"loss {name!r} is already registered (by "
                f"{_REGISTRY[name].fn.__module__}.{_REGISTRY[name].fn.__qualname__})"
            )
        params = inspect.signature(fn).parameters.values()
        positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        expected = 2 if init_state is not None else 1
        if len(positional) != expected:
            raise TypeError(
                f"loss {name!r}: expected {expected} positional parameter(s) "
                f"({'inputs, state' if expected == 2 else 'inputs'}) and keyword-only "
                f"hyperparameters, got {[p.name for p in positional]}"
            )
        _check_domains(name, fn, domains)
        _REGISTRY[name] = LossSpec(
            name=name,
            fn=fn,
            inputs=inputs,
            requires=tuple(requires),
            uses=tuple(uses),
            paper=paper,
            equation=equation,
            init_state=init_state,
            domains=tuple(domains.items()),
        )
        return fn

    return decorate


def _check_domains(name: str, fn: LossFn, domains: dict[str, Domain]) -> None:
    """Every domain is a hyperparameter's, every default is inside its domain. (A hyperparameter without
    a domain is not value-checked; every loss of this library declares them all, which a test checks.)"""
    defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    extra = sorted(set(domains) - set(defaults))
    if extra:
        raise TypeError(f"loss {name!r}: domains given for {extra}, which are not its hyperparameters "
                        f"({sorted(defaults)})")
    for hparam, domain in domains.items():
        if domain.problem(defaults[hparam]) is not None:
            raise TypeError(f"loss {name!r}: default {hparam}={defaults[hparam]!r} is outside its "
                            f"domain ({domain.requirement(hparam)})")


def get(name: str) -> LossSpec:
    """The registered loss `name`; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown loss {name!r}; registered losses are: {', '.join(names())}"
        ) from None


def names() -> list[str]:
    """All registered loss names, sorted."""
    return sorted(_REGISTRY)


def unregister(name: str) -> None:
    """Removes a loss (for tests that register throwaway losses)."""
    _REGISTRY.pop(name)
