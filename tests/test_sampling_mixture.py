"""Sampling from the token-level geometric mixture of two models (Nash-MD): identities, log-probs, stats."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from scipy import stats

from prefjax import models, sampling, sharding

B, P, N = 3, 8, 12
LENGTHS = (8, 5, 2)
PRESET = "llama3-tiny"


@pytest.fixture(scope="module")
def pair():
    """(cfg, graphdef, policy params, partner params): two initialisations of one model."""
    cfg = models.get_preset(PRESET)
    graphdef, policy = models.init_params(cfg, seed=0)
    _, partner = models.init_params(cfg, seed=1)
    return cfg, graphdef, policy, partner


def _prompts(cfg, b=B, p=P, seed=0):
    return np.asarray(jax.random.randint(jax.random.key(seed), (b, p), 1, cfg.vocab_size), np.int32)


def _generate(cfg, graphdef, params, prompts, lengths, **kwargs):
    kwargs.setdefault("max_new_tokens", N)
    kwargs.setdefault("rng", jax.random.key(7))
    return jax.device_get(sampling.generate(graphdef, params, cfg, prompts, np.asarray(lengths, np.int32),
                                            **kwargs))


def _teacher_forced_log_softmax(graphdef, params, prompts, lengths, generated):
    """[B, N, V] float64 log-softmax predicting each generated token, from one uncached forward."""
    b, n = generated.shape
    total = prompts.shape[1] + n
    tokens = np.zeros((b, total), np.int32)
    segments = np.zeros((b, total), np.int32)
    for row, length in enumerate(lengths):
        tokens[row, :length + n] = np.concatenate([prompts[row, :length], generated[row]])
        segments[row, :length + n] = 1
    model = nnx.merge(graphdef, params)
    hidden, _ = model(tokens, segments_BxT=segments)
    logits = np.asarray(model.logits(hidden), np.float64)
    log_softmax = logits - _logsumexp(logits)
    predicting = np.asarray(lengths)[:, None] - 1 + np.arange(n)[None, :]
    return log_softmax[np.arange(b)[:, None], predicting]


def _logsumexp(x):
    top = x.max(-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(-1, keepdims=True))


def _geometric_mixture(policy_logp, partner_logp, c):
    """Normalised log p^(1-c) q^c, in numpy float64."""
    mixed = (1 - c) * policy_logp + c * partner_logp
    return mixed - _logsumexp(mixed)


def _picked(logp_NxV, tokens):
    return np.take_along_axis(logp_NxV, tokens[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, top_k=20, top_p=0.9)],
                         ids=["plain", "filtered"])
def test_coefficient_zero_is_the_policy_and_one_is_the_partner(settings, pair):
    cfg, graphdef, policy, partner = pair
    prompts = _prompts(cfg)
    alone = _generate(cfg, graphdef, policy, prompts, LENGTHS, **settings)
    other = _generate(cfg, graphdef, partner, prompts, LENGTHS, **settings)
    at_zero = _generate(cfg, graphdef, policy, prompts, LENGTHS, mixture_params=partner, mixture_coef=0.0,
                        **settings)
    at_one = _generate(cfg, graphdef, policy, prompts, LENGTHS, mixture_params=partner, mixture_coef=1.0,
                       **settings)
    assert alone.policy_logps_BxN is None and at_zero.policy_logps_BxN.shape == (B, N)
    for field in ("tokens_BxN", "logps_BxN", "sample_logps_BxN", "lengths_B", "done_B"):
        np.testing.assert_array_equal(getattr(at_zero, field), getattr(alone, field), err_msg=field)
        np.testing.assert_array_equal(getattr(at_one, field), getattr(other, field), err_msg=field)
    np.testing.assert_array_equal(at_zero.policy_logps_BxN, alone.logps_BxN)
    # At c = 1 the first model only watches: its log-probs are of the partner's tokens.
    assert not np.array_equal(at_one.tokens_BxN, alone.tokens_BxN)
    expected = _picked(_teacher_forced_log_softmax(graphdef, policy, prompts, LENGTHS, at_one.tokens_BxN),
                       at_one.tokens_BxN)
    np.testing.assert_allclose(at_one.policy_logps_BxN, expected, atol=1e-5)


def test_mixture_log_probs_match_a_numpy_mixture_of_the_two_full_forwards(pair):
    cfg, graphdef, policy, partner = pair
    prompts = _prompts(cfg)
    c = 0.5
    # Temperature and filters change what is sampled, not the recorded untempered log-probs.
    out = _generate(cfg, graphdef, policy, prompts, LENGTHS, mixture_params=partner, mixture_coef=c,
                    temperature=0.8, top_p=0.95)
    policy_logp = _teacher_forced_log_softmax(graphdef, policy, prompts, LENGTHS, out.tokens_BxN)
    partner_logp = _teacher_forced_log_softmax(graphdef, partner, prompts, LENGTHS, out.tokens_BxN)
    mixture = _geometric_mixture(policy_logp, partner_logp, c)
    np.testing.assert_allclose(out.logps_BxN, _picked(mixture, out.tokens_BxN), atol=1e-5)
    np.testing.assert_allclose(out.policy_logps_BxN, _picked(policy_logp, out.tokens_BxN), atol=1e-5)
    # Neither end: the mixture's log-probs differ from the policy's and the partner's.
    assert np.abs(out.logps_BxN - out.policy_logps_BxN).max() > 1e-3
    assert np.abs(out.logps_BxN - _picked(partner_logp, out.tokens_BxN)).max() > 1e-3
    assert np.all(out.sample_logps_BxN <= 0) and np.any(out.sample_logps_BxN != out.logps_BxN)


def test_greedy_mixture_decoding_takes_the_argmax_of_the_mixed_logits(pair):
    cfg, graphdef, policy, partner = pair
    prompts = _prompts(cfg)
    out = _generate(cfg, graphdef, policy, prompts, LENGTHS, mixture_params=partner, mixture_coef=0.3,
                    greedy=True)
    policy_logp = _teacher_forced_log_softmax(graphdef, policy, prompts, LENGTHS, out.tokens_BxN)
    partner_logp = _teacher_forced_log_softmax(graphdef, partner, prompts, LENGTHS, out.tokens_BxN)
    mixture = _geometric_mixture(policy_logp, partner_logp, 0.3)
    np.testing.assert_array_equal(out.tokens_BxN, mixture.argmax(-1))
    # A different path from either model's own greedy decoding.
    assert not np.array_equal(out.tokens_BxN, policy_logp.argmax(-1))
    assert not np.array_equal(out.tokens_BxN, partner_logp.argmax(-1))


def test_first_tokens_follow_the_geometric_mixture_not_a_mixture_of_completions():
    """Many rows of one prompt: first-token frequencies against p^(1-c) q^c and against (1-c) p + c q.

    The latter is the first-token marginal of drawing each whole completion from one model or the
    other; both models are sharpened (a scaled unembedding) so that the two hypotheses are far apart.
    """
    v, rows, c = 16, 4000, 0.5
    cfg = models.get_preset(PRESET, vocab_size=v)
    graphdef, policy = models.init_params(cfg, seed=0)
    _, partner = models.init_params(cfg, seed=3)
    policy, partner = (dict(params, lm_head=params["lm_head"] * 8.0) for params in (policy, partner))
    prompts = np.tile(_prompts(cfg, 1, 4, seed=5), (rows, 1))
    lengths = np.full((rows,), 4, np.int32)
    out = _generate(cfg, graphdef, policy, prompts, lengths, mixture_params=partner, mixture_coef=c,
                    max_new_tokens=1, rng=jax.random.key(11))
    first = out.tokens_BxN[:1]
    p = np.exp(_teacher_forced_log_softmax(graphdef, policy, prompts[:1], (4,), first)[0, 0])
    q = np.exp(_teacher_forced_log_softmax(graphdef, partner, prompts[:1], (4,), first)[0, 0])
    geometric = np.exp(_geometric_mixture(np.log(p), np.log(q), c))
    arithmetic = (1 - c) * p + c * q
    assert 0.5 * np.abs(geometric - arithmetic).sum() > 0.1  # the test can tell them apart
    counts = np.bincount(out.tokens_BxN[:, 0], minlength=v)

    def chi_square(probs):
        expected = rows * probs
        return float(np.sum((counts - expected) ** 2 / np.maximum(expected, 1e-9)))

    bound = stats.chi2.ppf(0.999, df=v - 1)
    assert chi_square(geometric) < bound
    assert chi_square(arithmetic) > 10 * bound
    np.testing.assert_allclose(np.exp(out.logps_BxN[:, 0]), geometric[out.tokens_BxN[:, 0]], rtol=1e-4)


def test_sharded_mixture_sampling_equals_single_device():
    """Both caches and every output sharded over data x fsdp x tensor on 8 devices (tests/conftest.py)."""
    cfg = models.get_preset("gemma2-tiny")
    lengths = np.array([8, 5, 2, 1, 7, 3, 8, 4], np.int32)
    prompts = _prompts(cfg, b=8)
    graphdef, policy = models.init_params(cfg, seed=0)
    _, partner = models.init_params(cfg, seed=1)
    settings = dict(mixture_coef=0.4, top_p=0.9)
    expected = _generate(cfg, graphdef, policy, prompts, lengths, mixture_params=partner, **settings)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, policy = models.init_params(cfg, seed=0, mesh=mesh)
    _, partner = models.init_params(cfg, seed=1, mesh=mesh)
    with sharding.use_mesh(mesh):
        batch = NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), prompts.shape, mesh))
        rows = NamedSharding(mesh, sharding.logical_to_spec(("batch",), lengths.shape, mesh))
        out = sampling.generate(graphdef, policy, cfg, jax.device_put(prompts, batch),
                                jax.device_put(lengths, rows), max_new_tokens=N, rng=jax.random.key(7),
                                mixture_params=partner, **settings)
    assert out.policy_logps_BxN.sharding.is_equivalent_to(out.tokens_BxN.sharding, 2)  # sharded like the rest
    assert out.tokens_BxN.sharding.is_equivalent_to(batch, 2)
    np.testing.assert_array_equal(np.asarray(out.tokens_BxN), expected.tokens_BxN)
    for field in ("logps_BxN", "sample_logps_BxN", "policy_logps_BxN"):
        np.testing.assert_allclose(np.asarray(getattr(out, field)), getattr(expected, field), atol=1e-5,
                                   err_msg=field)


def test_the_coefficient_is_traced_and_stop_tokens_still_end_rows(pair):
    cfg, graphdef, policy, partner = pair
    prompts = _prompts(cfg)
    free = _generate(cfg, graphdef, policy, prompts, LENGTHS, mixture_params=partner, mixture_coef=0.5,
                     greedy=True)
    stop = int(free.tokens_BxN[0, 2])
    before = sampling._generate._cache_size()
    out = _generate(cfg, graphdef, policy, prompts, LENGTHS, mixture_params=partner, mixture_coef=0.25,
                    greedy=True, stop_tokens=(stop,), pad_id=-1)
    again = _generate(cfg, graphdef, policy, prompts, LENGTHS, mixture_params=partner, mixture_coef=0.75,
                      greedy=True, stop_tokens=(stop,), pad_id=-1)
    assert sampling._generate._cache_size() == before + 1  # new static stop tokens; c alone never recompiles
    assert not np.array_equal(out.tokens_BxN, again.tokens_BxN)
    for result in (out, again):
        for row in range(B):
            length = int(result.lengths_B[row])
            assert result.done_B[row] == (stop in result.tokens_BxN[row, :length].tolist())
            np.testing.assert_array_equal(result.tokens_BxN[row, length:], -1)
            np.testing.assert_array_equal(result.policy_logps_BxN[row, length:], 0.0)
            assert np.all(result.policy_logps_BxN[row, :length] < 0)


def test_bad_mixture_arguments_raise_clearly(pair):
    cfg, graphdef, policy, partner = pair
    prompts = _prompts(cfg)
    for coef in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"mixture_coef must be in \[0, 1\] .* got "):
            _generate(cfg, graphdef, policy, prompts, LENGTHS, mixture_params=partner, mixture_coef=coef)
    wider = dict(partner, lm_head=np.zeros((cfg.hidden_size, cfg.vocab_size + 8), np.float32))
    with pytest.raises(ValueError, match=r"same model as params .* at \['lm_head'\] params has shape "
                                         r"\(\d+, \d+\) and mixture_params has shape \(\d+, \d+\)"):
        _generate(cfg, graphdef, policy, prompts, LENGTHS, mixture_params=wider)
    deeper = dict(partner, layers={**partner["layers"], cfg.num_layers: partner["layers"][0]})
    with pytest.raises(ValueError, match=rf"at \['layers'\]\[{cfg.num_layers}\]\S* params has nothing and "
                                         r"mixture_params has shape"):
        _generate(cfg, graphdef, policy, prompts, LENGTHS, mixture_params=deeper)
