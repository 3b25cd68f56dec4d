"""Listwise losses (LiPO-lambda, PRO, DPO Plackett-Luce) against their papers' equations, in numpy.

Each `ref_*` function is written from the paper's equation (cited in its
docstring) in float64 numpy with explicit loops over the responses sorted by
score, independently of prefjax. The tests compare the registered losses with
them on random lists of several batch sizes and dtypes, with and without
padding slots, and check the losses' own properties: reductions to pairwise
losses at K = 2, padding, permutation invariance, ties, gradient signs and
finiteness at extreme log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefjax import losses
from prefjax.data import synthetic_logps as synthetic
from tests.losses.numpy_ref import as64, log_sigmoid

BATCHES = (1, 7, 64)
DTYPES = (jnp.float32, jnp.bfloat16)
NAMES = ("lipo", "pro", "plackett_luce")


@functools.lru_cache(maxsize=None)
def _compiled(name: str, kind: str):
    """jit of the loss with traced hyperparameters: its output, its losses only, or value and grad in logps.

    Tests share these programs, so each loss compiles once per input shape
    rather than once per test (eager dispatch compiles every op per shape).
    """
    spec = losses.get(name)
    if kind == "output":
        return jax.jit(lambda lp, hp: spec(lp, **hp))
    if kind == "losses":
        return jax.jit(lambda lp, hp: spec(lp, **hp).losses)

    def total(logps, lp, hp):
        return spec(dataclasses.replace(lp, logps=logps), **hp).losses.sum()

    return jax.jit(jax.value_and_grad(total))


def _hparams(name: str, hparams: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in {**losses.get(name).hparam_defaults, **hparams}.items()}


def _declared(name: str, lp):
    """`lp` without the optional fields the loss does not declare, so that tests share compiled programs."""
    spec = losses.get(name)
    unused = {f.name: None for f in dataclasses.fields(lp)
              if f.default is None and f.name not in spec.requires + spec.uses}
    return dataclasses.replace(lp, **unused)


def run(name: str, lp, **hparams) -> losses.LossOutput:
    """The registered loss's output, compiled (hyperparameters are traced, not static)."""
    return _compiled(name, "output")(_declared(name, lp), _hparams(name, hparams))


def run_losses(name: str, lp, **hparams) -> jax.Array:
    """Only the [B] per-example losses (a smaller program to compile than the full output)."""
    return _compiled(name, "losses")(_declared(name, lp), _hparams(name, hparams))


def grad_logps(name: str, lp, **hparams) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the per-example losses, its gradient in the policy log-probs)."""
    value, grad = _compiled(name, "grad")(lp.logps, _declared(name, lp), _hparams(name, hparams))
    return np.asarray(value), np.asarray(grad)


def _f64(x) -> np.ndarray:
    """float64 values of a field; float64 numpy arrays (finite-difference probes) pass through unrounded."""
    if isinstance(x, np.ndarray) and x.dtype == np.float64:
        return x
    return as64(x)


def _logsumexp(x: np.ndarray) -> float:
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m))))


def _valid_slots(lp, b: int) -> np.ndarray:
    """Indices of the valid slots of example b, sorted by score descending (scores distinct)."""
    idx = np.arange(lp.logps.shape[1])
    if lp.mask is not None:
        idx = idx[np.asarray(lp.mask[b]) > 0]
    psi = as64(lp.scores[b])[idx]
    return idx[np.argsort(-psi, kind="stable")]


def ref_plackett_luce(lp, beta=0.1):
    """DPO Appendix A.3, eq. 18: -log prod_k exp(beta rho_(k)) / sum_{j>=k} exp(beta rho_(j)), by psi."""
    out = []
    for b in range(lp.logps.shape[0]):
        order = _valid_slots(lp, b)
        s = beta * (_f64(lp.logps)[b] - as64(lp.ref_logps[b]))[order]
        out.append(sum(-(s[k] - _logsumexp(s[k:])) for k in range(len(s) - 1)))
    return np.array(out)


def ref_lipo(lp, beta=0.05):
    """LiPO-lambda (Liu et al. 2024, Sec. 4): sum_{psi_i > psi_j} -Delta_ij log sigma(s_i - s_j).

    s = beta rho, Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|, G = 2^psi - 1,
    D(tau) = ln(1 + tau), tau = 1-based position when sorting by s descending
    (ties in s: higher psi first, then slot index).
    """
    out = []
    for b in range(lp.logps.shape[0]):
        idx = _valid_slots(lp, b)
        s_all = beta * (_f64(lp.logps)[b] - as64(lp.ref_logps[b]))
        psi_all = as64(lp.scores[b])
        by_model = sorted(idx, key=lambda i: (-s_all[i], -psi_all[i], i))
        tau = {int(i): pos + 1 for pos, i in enumerate(by_model)}
        total = 0.0
        for i in idx:
            for j in idx:
                if psi_all[i] > psi_all[j]:
                    gain = abs((2 ** psi_all[i] - 1) - (2 ** psi_all[j] - 1))
                    disc = abs(1 / math.log(1 + tau[int(i)]) - 1 / math.log(1 + tau[int(j)]))
                    total += -gain * disc * log_sigmoid(s_all[i] - s_all[j])
        out.append(total)
    return np.array(out)


def ref_pro(lp, sft_weight=0.05, dynamic_temperature=True):
    """PRO (Song et al. 2024): -sum_{k<n} log exp(r_k / T_k^k) / sum_{i>=k} exp(r_i / T_k^i) + beta NLL(y^1).

    r = length-averaged log-prob, T_k^i = 1 / (psi_k - psi_i) for i > k,
    T_k^k = min_{i>k} T_k^i (all T = 1 without dynamic temperature),
    beta = sft_weight (n - 1)^2 and NLL(y^1) = -log pi_theta(y^1|x) (sequence sum, authors' code).
    """
    out = []
    for b in range(lp.logps.shape[0]):
        order = _valid_slots(lp, b)
        logp = _f64(lp.logps)[b][order]
        r = logp / as64(lp.lengths[b])[order]
        psi = as64(lp.scores[b])[order]
        n = len(order)
        total = 0.0
        for k in range(n - 1):
            if dynamic_temperature:
                temps = [1.0 / (psi[k] - psi[i]) for i in range(k + 1, n)]
                temps = [min(temps)] + temps
            else:
                temps = [1.0] * (n - k)
            z = np.array([r[k + m] / temps[m] for m in range(n - k)])
            total += -(z[0] - _logsumexp(z))
        total += sft_weight * (n - 1) ** 2 * -logp[0]
        out.append(total)
    return np.array(out)


CASES = [
    ("plackett_luce", ref_plackett_luce, {}),
    ("plackett_luce", ref_plackett_luce, {"beta": 0.5}),
    ("lipo", ref_lipo, {}),
    ("lipo", ref_lipo, {"beta": 0.3}),
    ("pro", ref_pro, {}),
    ("pro", ref_pro, {"dynamic_temperature": False}),
    ("pro", ref_pro, {"sft_weight": 0.0, "dynamic_temperature": False}),
]


def _with_padding(lp, seed: int):
    """The same lists with random padding slots (>= 2 valid per list) filled with garbage."""
    rng = np.random.default_rng(seed)
    batch, k = lp.logps.shape
    mask = np.ones((batch, k), np.float32)
    for b in range(batch):
        drop = rng.choice(k, size=rng.integers(0, k - 1), replace=False)
        mask[b, drop] = 0.0
    pad = mask == 0

    def garbage(x, value):
        return jnp.asarray(np.where(pad, value, np.asarray(x, np.float32)), x.dtype)

    fields = {"mask": jnp.asarray(mask), "logps": garbage(lp.logps, -1e4), "scores": garbage(lp.scores, 99.0)}
    if lp.ref_logps is not None:
        fields["ref_logps"] = garbage(lp.ref_logps, 1e4)
    if lp.lengths is not None:
        fields["lengths"] = garbage(lp.lengths, 0.0)
    return synthetic.replace(lp, **fields)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name,ref,hparams", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_paper_equation(name, ref, hparams, batch, dtype, padded):
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=batch, seed=batch, dtype=dtype)
    if padded:
        lp = _with_padding(lp, seed=batch)
    values = run_losses(name, lp, **hparams)
    assert values.dtype == jnp.float32
    assert values.shape == (batch,)
    np.testing.assert_allclose(np.asarray(values), ref(lp, **hparams), rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("name,ref,hparams", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_python_hyperparameters_match_traced_ones(name, ref, hparams):
    """The usual call, hyperparameters as Python constants (a Python bool flag included)."""
    spec = losses.get(name)
    lp = _with_padding(synthetic.make_inputs(spec, batch=7, seed=3), seed=3)
    static = jax.jit(lambda x: spec(x, **hparams).losses)(lp)
    np.testing.assert_allclose(static, run_losses(name, lp, **hparams), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(static, ref(lp, **hparams), rtol=3e-5, atol=3e-5)


# --- K = 2 reductions to pairwise losses ------------------------------------------------------


def _pair_list(batch: int, seed: int):
    """K = 2 lists in random slot order and the equivalent PairLogps (winner = higher score)."""
    rng = np.random.default_rng(seed)
    logps = rng.uniform(-60, -5, (batch, 2))
    ref = rng.uniform(-60, -5, (batch, 2))
    lengths = rng.integers(1, 30, (batch, 2)).astype(np.float64)
    gap = rng.uniform(0.1, 2.0, batch)
    win_first = rng.uniform(size=batch) < 0.5
    zeros = np.zeros(batch)
    scores = np.where(win_first[:, None], np.stack([gap, zeros], 1), np.stack([zeros, gap], 1))
    w, lo = np.where(win_first, 0, 1), np.where(win_first, 1, 0)
    rows = np.arange(batch)
    lst = losses.ListLogps(logps=jnp.asarray(logps, jnp.float32), scores=jnp.asarray(scores, jnp.float32),
                           ref_logps=jnp.asarray(ref, jnp.float32), lengths=jnp.asarray(lengths, jnp.float32))
    pair = losses.PairLogps(
        chosen=jnp.asarray(logps[rows, w], jnp.float32), rejected=jnp.asarray(logps[rows, lo], jnp.float32),
        ref_chosen=jnp.asarray(ref[rows, w], jnp.float32),
        ref_rejected=jnp.asarray(ref[rows, lo], jnp.float32),
        chosen_len=jnp.asarray(lengths[rows, w], jnp.float32),
        rejected_len=jnp.asarray(lengths[rows, lo], jnp.float32))
    return lst, pair, gap


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_plackett_luce_at_two_responses_is_dpo(beta):
    lst, pair, _ = _pair_list(7, seed=1)
    np.testing.assert_allclose(run_losses("plackett_luce", lst, beta=beta),
                               losses.get("dpo")(pair, beta=beta).losses, rtol=1e-5, atol=1e-6)


def test_lipo_at_two_responses_is_lambda_weighted_dpo():
    """Delta = (G_w - G_l)(1/ln 2 - 1/ln 3) whatever the model's order of the two."""
    lst, pair, gap = _pair_list(7, seed=2)
    beta = 0.05
    weight = (2.0**gap - 1.0) * (1 / math.log(2) - 1 / math.log(3))
    dpo = np.asarray(losses.get("dpo")(pair, beta=beta).losses)
    np.testing.assert_allclose(run_losses("lipo", lst, beta=beta), weight * dpo, rtol=1e-5, atol=1e-6)


def test_pro_at_two_responses_is_bradley_terry_on_mean_logps():
    lst, pair, gap = _pair_list(7, seed=3)
    mean_w = as64(pair.chosen) / as64(pair.chosen_len)
    mean_l = as64(pair.rejected) / as64(pair.rejected_len)
    pro = functools.partial(run_losses, "pro")
    np.testing.assert_allclose(pro(lst, sft_weight=0.0, dynamic_temperature=False),
                               -log_sigmoid(mean_w - mean_l), rtol=1e-5, atol=1e-6)
    # Dynamic temperature at K = 2: both temperatures are 1 / (psi_w - psi_l).
    np.testing.assert_allclose(pro(lst, sft_weight=0.0), -log_sigmoid(gap * (mean_w - mean_l)),
                               rtol=1e-5, atol=1e-6)
    # Default SFT weight at n = 2: 0.05 * (2 - 1)^2 times the sequence NLL of the winner.
    np.testing.assert_allclose(pro(lst) - pro(lst, sft_weight=0.0), 0.05 * -as64(pair.chosen),
                               rtol=1e-4)


# --- padding, permutations, ties -----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_padded_slot_equals_shorter_list(name):
    """A K = 4 list with one garbage padding slot gives the K = 3 list's loss and finite gradients."""
    spec = losses.get(name)
    short = synthetic.make_inputs(spec, batch=7, seed=11)
    short = synthetic.replace(short, **{f: getattr(short, f)[:, :3] for f in ("logps", "scores", "ref_logps",
                                                                              "lengths", "mask")
                                        if getattr(short, f) is not None})
    pad_col = {"logps": jnp.nan, "scores": 1e3, "ref_logps": -jnp.inf, "lengths": 0.0, "mask": 0.0}
    fields = {}
    for f, value in pad_col.items():
        if getattr(short, f) is not None:
            x = getattr(short, f)
            fields[f] = jnp.concatenate([x[:, :1], jnp.full((7, 1), value, x.dtype), x[:, 1:]], axis=1)
    long = losses.ListLogps(**fields)
    out_long, out_short = run(name, long), run(name, short)
    np.testing.assert_allclose(out_long.losses, out_short.losses, rtol=1e-6, atol=1e-6)
    for key, value in out_long.metrics.items():
        np.testing.assert_allclose(value, out_short.metrics[key], rtol=1e-6, atol=1e-6, err_msg=key)
    _, grad = grad_logps(name, long)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[:, 1], 0.0)


# Lists of K = 4 slots; random masks give the shorter lists (one shape keeps the test fast).
_SLOTS = 4
_list_strategy = st.tuples(
    st.lists(st.integers(0, 3), min_size=_SLOTS, max_size=_SLOTS),  # scores, with ties
    st.lists(st.floats(-50, -1), min_size=_SLOTS, max_size=_SLOTS),  # logps
    st.lists(st.sampled_from([-30.0, -10.0, -3.0]), min_size=_SLOTS, max_size=_SLOTS),  # ref (ties in rho)
    st.lists(st.integers(1, 20), min_size=_SLOTS, max_size=_SLOTS),  # lengths
    st.lists(st.booleans(), min_size=_SLOTS, max_size=_SLOTS),  # mask
    st.permutations(list(range(_SLOTS))),
)


@settings(max_examples=25, deadline=None)
@given(_list_strategy)
def test_permutation_invariance(case):
    """Shuffling the slots (with scores, lengths and mask) leaves every loss unchanged, ties included."""
    scores, logps, ref, lengths, mask, perm = (np.asarray(x, np.float32) for x in case)
    perm = perm.astype(int)

    def build(p):
        return losses.ListLogps(logps=jnp.asarray(logps[p])[None], scores=jnp.asarray(scores[p])[None],
                                ref_logps=jnp.asarray(ref[p])[None], lengths=jnp.asarray(lengths[p])[None],
                                mask=jnp.asarray(mask[p])[None])

    for name in NAMES:
        base, shuffled = run_losses(name, build(np.arange(_SLOTS))), run_losses(name, build(perm))
        np.testing.assert_allclose(shuffled, base, rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.all(np.isfinite(base))


def _list(scores, logps, ref=None, lengths=None):
    """A batch-of-one ListLogps from python lists (ref log-probs 0 and lengths 1 unless given)."""
    arr = lambda x: jnp.asarray([x], jnp.float32)  # noqa: E731
    ones = [1.0] * len(scores)
    return losses.ListLogps(logps=arr(logps), scores=arr(scores), ref_logps=arr(ref or [0.0] * len(scores)),
                            lengths=arr(lengths or ones), mask=arr(ones))


def test_all_tied_scores_give_no_ranking_loss():
    lp = _list([2.0] * 4, [-5.0, -9.0, -1.0, -2.0], ref=[-3.0] * 4, lengths=[1.0, 2.0, 4.0, 8.0])
    assert float(run("lipo", lp).losses[0]) == 0.0
    assert float(run("plackett_luce", lp).losses[0]) == 0.0
    out = run("pro", lp)
    assert float(out.metrics["pro/ranking_loss"][0]) == 0.0
    # SFT on all four tied best responses (mean sequence NLL), weight 0.05 (4 - 1)^2.
    np.testing.assert_allclose(out.losses[0], 0.05 * 9 * (5.0 + 9.0 + 1.0 + 2.0) / 4, rtol=1e-6)


def test_plackett_luce_tied_responses_do_not_compete():
    """Scores (1, 1, 0, -1): each tied winner's softmax holds only itself and the two responses below."""
    a, b, c, d = 0.3, -0.2, 0.1, 0.5
    lp = _list([1.0, 1.0, 0.0, -1.0], [a, b, c, d])
    expected = sum(_logsumexp(np.array([x, c, d])) - x for x in (a, b)) + _logsumexp(np.array([c, d])) - c
    np.testing.assert_allclose(run_losses("plackett_luce", lp, beta=1.0)[0], expected, rtol=1e-6)


def test_pro_tied_responses_stay_finite_under_dynamic_temperature():
    """Scores (2, 1, 1, 0): gaps multiply the log-likelihoods; the tied pair contrasts only with the last."""
    s = np.array([-2.0, -3.0, -4.0, -1.5])
    lp = _list([2.0, 1.0, 1.0, 0.0], list(s))
    # 1/T = score gaps 1, 1, 2 for the three below; the target's 1/T is their max, 2.
    first = _logsumexp(np.array([2 * s[0], s[1], s[2], 2 * s[3]])) - 2 * s[0]
    middle = sum(_logsumexp(np.array([x, s[3]])) - x for x in (s[1], s[2]))
    np.testing.assert_allclose(run_losses("pro", lp, sft_weight=0.0)[0], first + middle, rtol=1e-6)


def test_lipo_lambda_weights_follow_model_ranks():
    """Same labels, model order agreeing or reversed: Delta uses the model's ranks, not the labels'."""
    scores = [1.5, 1.0, 0.5, 0.0]
    gains = [2**p - 1 for p in scores]
    d = lambda t: 1 / math.log(1 + t)  # noqa: E731
    for logps, ranks in (([4.0, 3.0, 2.0, 1.0], [1, 2, 3, 4]), ([1.0, 2.0, 3.0, 4.0], [4, 3, 2, 1])):
        expected = sum(abs(gains[i] - gains[j]) * abs(d(ranks[i]) - d(ranks[j]))
                       for i in range(4) for j in range(i + 1, 4))
        out = run("lipo", _list(scores, logps))
        np.testing.assert_allclose(out.metrics["lipo/lambda_weight_sum"][0], expected, rtol=1e-6)


# --- gradients and extremes ----------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("name", NAMES)
def test_gradient_signs_at_top_and_bottom(name, ties):
    """Raising the best response's log-prob never increases the loss; raising the worst never decreases it."""
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=64, seed=21)
    if ties:
        rng = np.random.default_rng(22)
        lp = synthetic.replace(lp, scores=jnp.asarray(rng.integers(0, 3, lp.scores.shape), jnp.float32))
    lp = _with_padding(lp, seed=21)
    _, grad = grad_logps(name, lp)
    psi = np.where(np.asarray(lp.mask) > 0, np.asarray(lp.scores), np.nan)
    top = psi == np.nanmax(psi, axis=1, keepdims=True)
    # A list whose valid responses all tie has no bottom to push down (PRO still fine-tunes on them).
    bottom = (psi == np.nanmin(psi, axis=1, keepdims=True)) & ~top
    assert np.all(grad[top] <= 0.0)
    assert np.all(grad[bottom] >= 0.0)


@pytest.mark.parametrize("name,ref,hparams", CASES[::2], ids=[c[0] for c in CASES[::2]])
def test_gradient_matches_finite_differences_of_reference(name, ref, hparams):
    """jax.grad equals central differences of the float64 equation (LiPO's Delta acts as a constant)."""
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=1, seed=5)
    _, grad = grad_logps(name, lp, **hparams)
    base = np.asarray(lp.logps, np.float64)
    eps = 1e-5
    fd = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        up, down = base.copy(), base.copy()
        up[idx] += eps
        down[idx] -= eps
        fd[idx] = (ref(synthetic.replace(lp, logps=up), **hparams).sum()
                   - ref(synthetic.replace(lp, logps=down), **hparams).sum()) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_finite_at_extreme_logps(name):
    """Log-probs down to -1e4 and log-ratios of +-1e4: finite loss and gradient."""
    spec = losses.get(name)
    lp = synthetic.make_inputs(spec, batch=7, seed=31)
    rng = np.random.default_rng(31)
    extreme = jnp.asarray(rng.choice([-1e4, -1e-3, -5e3], size=lp.logps.shape), jnp.float32)
    fields = {"logps": extreme}
    if lp.ref_logps is not None:
        fields["ref_logps"] = jnp.asarray(rng.choice([-1e4, -1e-3], size=lp.logps.shape), jnp.float32)
    if lp.lengths is not None:
        fields["lengths"] = jnp.ones_like(lp.lengths)
    lp = synthetic.replace(lp, **fields)

    value, grad = grad_logps(name, lp)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


# --- metrics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_metrics_compare_best_and_worst_responses(name):
    """TRL pair metrics: best-scored valid response vs worst; pair accuracy over all ordered pairs."""
    spec = losses.get(name)
    lp = _with_padding(synthetic.make_inputs(spec, batch=7, seed=51), seed=51)
    out = run(name, lp)
    mask = np.asarray(lp.mask) > 0
    logps = as64(lp.logps)
    if name == "pro":
        rewards = logps / np.where(mask, as64(lp.lengths), 1.0)
    else:
        rewards = spec.hparam_defaults["beta"] * (logps - as64(lp.ref_logps))
    psi = np.where(mask, as64(lp.scores), np.nan)
    rows = np.arange(7)
    best, worst = np.nanargmax(psi, axis=1), np.nanargmin(psi, axis=1)
    np.testing.assert_allclose(out.metrics["rewards/chosen"], rewards[rows, best], rtol=1e-5)
    np.testing.assert_allclose(out.metrics["rewards/rejected"], rewards[rows, worst], rtol=1e-5)
    np.testing.assert_allclose(out.metrics["logps/chosen"], logps[rows, best], rtol=1e-6)
    pairs = mask[:, :, None] & mask[:, None, :] & (psi[:, :, None] > psi[:, None, :])
    ordered = pairs & (rewards[:, :, None] > rewards[:, None, :])
    np.testing.assert_array_equal(out.metrics["list/num_pairs"], pairs.sum((1, 2)))
    accuracy = ordered.sum((1, 2)) / pairs.sum((1, 2))
    np.testing.assert_allclose(out.metrics["list/pair_accuracy"], accuracy, rtol=1e-6)
    for value in out.metrics.values():
        assert value.shape == (7,)
