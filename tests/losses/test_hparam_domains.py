"""Every loss hyperparameter's declared domain: defaults inside it, each boundary refused with the
key, the rule and the reason in the message, a value just inside accepted with a finite loss.

The cases are derived from the declarations (prefjax.losses.hparam_domains) over the whole
registry, so a newly registered loss is covered without editing this file; the messages of the
issue's two examples (IPO's beta = 0, robust DPO's label_smoothing = 0.5) are spelled out.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from prefjax import losses
from prefjax.data import synthetic_logps as synthetic
from prefjax.losses import hparam_domains, registry, types
from prefjax.train import config_lib

# How far inside an open bound "just inside" is: close to the edge, yet far enough that the loss's
# float32 arithmetic stays finite (IPO's target 1/(2*beta) is 500 at beta = 1e-3).
STEP = 1e-3


def _edges(domain: hparam_domains.Domain, default):
    """(refused values, accepted values) at the domain's boundaries, from its declaration."""
    if isinstance(domain, hparam_domains.Real):
        refused, accepted = [math.inf, math.nan, str(default), True], []
        bounded = domain.low is not None and domain.high is not None
        step = min(STEP, (domain.high - domain.low) / 4) if bounded else STEP
        if domain.low is not None:
            refused.append(domain.low if domain.low_open else domain.low - step)
            accepted.append(domain.low + step if domain.low_open else domain.low)
        if domain.high is not None:
            refused.append(domain.high if domain.high_open else domain.high + step)
            accepted.append(domain.high - step if domain.high_open else domain.high)
        if domain.low is None and domain.high is None:
            accepted += [-10.0, 10.0]
        return refused, accepted
    if isinstance(domain, hparam_domains.Integer):
        return [domain.low - 1, domain.low + 0.5, str(domain.low)], [domain.low, domain.low + 1]
    if isinstance(domain, hparam_domains.Flag):
        return [1, "True", None], [True, False]
    if isinstance(domain, hparam_domains.Choice):
        return ["none_of_these", 0, None], list(domain.choices)
    if isinstance(domain, hparam_domains.LeadingPositiveWeights):
        rest = tuple(default[1:])
        return ([(0.0,) + rest, (-STEP,) + rest, tuple(default[:domain.min_len - 1]), (default[0], math.nan),
                 ",".join(map(str, default))],
                [(STEP,) + rest])
    raise AssertionError(f"no boundary cases for {type(domain).__name__}: add them here")


CASES = [(name, hparam) for name in losses.names() for hparam in losses.get(name).hparam_domains]


def _finite_losses(spec: registry.LossSpec, **hparams) -> np.ndarray:
    """The per-example losses on small random inputs (a stateful loss's state from the defaults)."""
    inputs = synthetic.make_inputs(spec, batch=4, seed=3)
    if spec.stateful:
        out = spec(inputs, synthetic.initial_state(spec), **hparams)
    else:
        out = spec(inputs, **hparams)
    return np.asarray(out.losses)


def test_every_loss_declares_a_domain_with_a_reason_for_every_hyperparameter():
    for name in losses.names():
        spec = losses.get(name)
        assert set(spec.hparam_domains) == set(spec.hparam_defaults), name
        for hparam, domain in spec.hparam_domains.items():
            assert len(domain.why) > 15, (name, hparam)


@pytest.mark.parametrize("name", losses.names())
def test_every_losss_defaults_pass_its_domains_and_the_config_check(name):
    spec = losses.get(name)
    spec.check_hparam_values(spec.hparam_defaults)
    config_lib.check_loss_hparams(name, dict(spec.hparam_defaults))
    config = config_lib.trainer_config()
    config.loss_name = name
    config.loss = ml_collections.ConfigDict(spec.hparam_defaults)
    config_lib.check_loss_hparams(name, config.loss.to_dict())
    assert np.all(np.isfinite(_finite_losses(spec))), name


@pytest.mark.parametrize("name, hparam", CASES, ids=[f"{n}.{h}" for n, h in CASES])
def test_a_boundary_value_is_refused_naming_the_key_and_a_value_just_inside_trains(name, hparam):
    spec = losses.get(name)
    domain = spec.hparam_domains[hparam]
    refused, accepted = _edges(domain, spec.hparam_defaults[hparam])
    for value in refused:
        with pytest.raises(config_lib.ConfigError) as err:
            config_lib.check_loss_hparams(name, {**spec.hparam_defaults, hparam: value})
        message = str(err.value)
        assert message.startswith(f"config.loss.{hparam}={value!r}: loss {name!r} needs "
                                  f"{domain.requirement(hparam)} ({domain.why})"), message
        assert message.endswith(f"; set {domain.hint}"), message
        # The library's own entry point refuses it too, before any arithmetic.
        with pytest.raises(registry.LossHparamError, match=f"^{hparam}="):
            _finite_losses(spec, **{hparam: value})
    for value in accepted:
        config_lib.check_loss_hparams(name, {**spec.hparam_defaults, hparam: value})
        values = _finite_losses(spec, **{hparam: value})
        assert np.all(np.isfinite(values)), (name, hparam, value, values)


@pytest.mark.parametrize("name, key, value, expected", [
    ("ipo", "beta", 0.0,
     "config.loss.beta=0.0: loss 'ipo' needs beta > 0 (it divides by it: the IPO target is 1/(2*beta)); "
     "set a positive value"),
    ("robust_dpo", "label_smoothing", 0.5,
     "config.loss.label_smoothing=0.5: loss 'robust_dpo' needs 0 <= label_smoothing < 0.5 (it divides by "
     "1 - 2 label_smoothing; the method assumes flip rates below 1/2); set a value in [0, 0.5)"),
    ("ipo", "beta", "0.1",
     "config.loss.beta='0.1': loss 'ipo' needs beta > 0 (it divides by it: the IPO target is 1/(2*beta)); "
     "'0.1' is a str, not a number; set a positive value"),
    ("fdpo", "divergence", "hellinger",
     "config.loss.divergence='hellinger': loss 'fdpo' needs divergence to be one of ['reverse_kl', "
     "'forward_kl', 'js', 'alpha'] (the f-divergences whose f' is implemented, the paper's Table 1); "
     "set one of them"),
])
def test_validate_refuses_the_issues_examples_in_one_sentence(name, key, value, expected):
    config = config_lib.trainer_config()
    config.loss_name = name
    config.loss = ml_collections.ConfigDict({key: value})
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(config, num_devices=1)
    assert str(err.value) == expected


def test_validate_checks_the_defaults_of_keys_the_config_leaves_out():
    config = config_lib.trainer_config()
    config.loss_name = "robust_dpo"
    config.loss = ml_collections.ConfigDict({"beta": 0.2})  # label_smoothing: the default, 0.1
    config_lib.validate(config, num_devices=1)
    config.loss.beta = -0.2
    with pytest.raises(config_lib.ConfigError, match=r"^config.loss.beta=-0.2: loss 'robust_dpo' needs beta > 0 "):
        config_lib.validate(config, num_devices=1)


def test_arrays_are_not_checked_so_a_jitted_hyperparameter_still_works():
    spec = losses.get("ipo")
    inputs = synthetic.make_inputs(spec, batch=2)
    out = spec(inputs, beta=jnp.asarray(0.2))
    assert np.all(np.isfinite(np.asarray(out.losses)))


def test_registration_refuses_a_default_outside_its_domain_or_a_domain_for_no_hyperparameter():
    with pytest.raises(TypeError, match=r"default beta=0.0 is outside its domain \(beta > 0\)"):
        @losses.register("bad_default", inputs=types.PairLogps, paper="x", equation="x",
                         domains={"beta": hparam_domains.positive("it divides by it")})
        def _bad_default(lp, *, beta: float = 0.0):  # pragma: no cover - never called
            return None
    with pytest.raises(TypeError, match=r"domains given for \['gamma'\], which are not its hyperparameters"):
        @losses.register("bad_domain", inputs=types.PairLogps, paper="x", equation="x",
                         domains={"gamma": hparam_domains.any_real("a margin")})
        def _bad_domain(lp, *, beta: float = 0.1):  # pragma: no cover - never called
            return None
    assert "bad_default" not in losses.names() and "bad_domain" not in losses.names()
