"""Pair construction from K scored samples per prompt, against explicit loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from prefjax.online import pairs
from prefjax.online.rewards import PreferenceFunction, PythonReward


def _rewards_with_ties(seed: int = 0, n: int = 200, k: int = 4) -> np.ndarray:
    # Few distinct values: many ties among the best, among the worst, and whole rows tied.
    return np.random.default_rng(seed).integers(0, 3, size=(n, k)).astype(np.float64)


def test_best_worst_matches_a_loop_with_earliest_index_on_ties():
    r = _rewards_with_ties()
    chosen, rejected, valid = pairs.best_worst(r)
    for n, row in enumerate(r):
        best = min(k for k in range(len(row)) if row[k] == max(row))
        worst = min(k for k in range(len(row)) if row[k] == min(row))
        assert (chosen[n], rejected[n], bool(valid[n])) == (best, worst, max(row) > min(row))
    assert 0 < valid.sum() < len(r)  # the fixture has both kinds of rows
    assert chosen.dtype == np.int64 and valid.dtype == bool


def test_nan_rewards_are_left_out_and_rows_without_two_finite_rewards_are_invalid():
    r = np.array([[np.nan, 1.0, 3.0, np.nan], [np.nan, np.nan, 2.0, np.nan], [np.nan] * 4, [0.0, np.nan, 0.0, 1.0]])
    chosen, rejected, valid = pairs.best_worst(r)
    np.testing.assert_array_equal(valid, [True, False, False, True])
    assert (chosen[0], rejected[0]) == (2, 1) and (chosen[3], rejected[3]) == (3, 0)
    assert pairs.tie_fraction(r) == 0.5


def test_best_only_is_the_best_sample_where_it_beats_the_worst():
    r = np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [5.0, -1.0, 2.0]])
    best, valid = pairs.best_only(r)
    np.testing.assert_array_equal(best, [1, 0, 0])
    np.testing.assert_array_equal(valid, [True, False, True])


def test_random_pair_is_two_distinct_samples_ordered_by_reward_and_deterministic_in_the_rng():
    r = _rewards_with_ties(seed=1, n=3000, k=4)
    chosen, rejected, valid = pairs.random_pair(r, np.random.default_rng(7))
    rows = np.arange(len(r))
    assert np.all(chosen != rejected)
    assert np.all(r[rows, chosen] >= r[rows, rejected])
    np.testing.assert_array_equal(valid, r[rows, chosen] > r[rows, rejected])
    again = pairs.random_pair(r, np.random.default_rng(7))
    for x, y in zip((chosen, rejected, valid), again):
        np.testing.assert_array_equal(x, y)
    other = pairs.random_pair(r, np.random.default_rng(8))
    assert not np.array_equal(chosen, other[0])
    # Every unordered pair of the 4 samples is drawn about equally often (6 pairs, 1/6 each).
    drawn = np.sort(np.stack([chosen, rejected], axis=1), axis=1)
    counts = [np.sum((drawn[:, 0] == a) & (drawn[:, 1] == b)) for a, b in itertools.combinations(range(4), 2)]
    assert min(counts) > 0.8 * len(r) / 6 and max(counts) < 1.2 * len(r) / 6


def test_random_pair_needs_two_samples_and_a_tie_is_invalid():
    with pytest.raises(ValueError, match=r"at least 2 samples per prompt, got rewards of shape \[3, 1\]"):
        pairs.random_pair(np.zeros((3, 1)), np.random.default_rng(0))
    _, _, valid = pairs.random_pair(np.ones((5, 3)), np.random.default_rng(0))
    assert not valid.any()
    with pytest.raises(ValueError, match=r"must be \[N prompts, K >= 1 samples\], got shape \[4\]"):
        pairs.best_worst(np.zeros(4))


def test_tie_fraction_counts_rows_whose_rewards_all_tie():
    r = _rewards_with_ties(seed=2, n=300, k=3)
    want = np.mean([len(set(row)) == 1 for row in r])
    assert 0 < want < 1
    assert pairs.tie_fraction(r) == pytest.approx(want)
    assert pairs.tie_fraction(np.zeros((0, 3))) == 0.0


def test_win_rates_are_the_mean_preference_over_the_other_samples():
    p = np.random.default_rng(3).uniform(size=(5, 4, 4))
    got = pairs.win_rates(p)
    for n in range(5):
        for k in range(4):
            assert got[n, k] == pytest.approx(np.mean([p[n, k, j] for j in range(4) if j != k]))
    with pytest.raises(ValueError, match=r"\[N, K, K\] with K >= 2, got shape \[2, 1, 1\]"):
        pairs.win_rates(np.zeros((2, 1, 1)))


class _Counting:
    """A reward by response length, counting how often it is called."""

    calls = 0

    def __call__(self, prompts, responses):
        self.calls += 1
        return [len(p) * 0.1 + len(r) for p, r in zip(prompts, responses)]


def test_preference_matrix_of_a_bradley_terry_source_in_one_call():
    fn = _Counting()
    source = PythonReward(fn, preference_scale=0.7)
    prompts = ["a", "bb"]
    responses = [["x", "xxx", "xx"], ["yyyy", "y", "yy"]]
    got = pairs.preference_matrix(source, prompts, responses)
    assert fn.calls == 1 and got.shape == (2, 3, 3)
    for n in range(2):
        r = [len(prompts[n]) * 0.1 + len(y) for y in responses[n]]
        for a in range(3):
            for b in range(3):  # the diagonal too: sigmoid(0) = 0.5
                want = 1.0 / (1.0 + np.exp(-0.7 * (r[a] - r[b])))
                assert got[n, a, b] == pytest.approx(want, abs=1e-12)
    np.testing.assert_allclose(np.diagonal(got, axis1=1, axis2=2), 0.5)
    np.testing.assert_allclose(got + np.swapaxes(got, 1, 2), 1.0, atol=1e-12)
    np.testing.assert_allclose(pairs.preference_matrix(source, prompts, responses, symmetrize=False), got, atol=1e-12)


def test_preference_matrix_averages_the_two_orders_of_a_position_biased_judge():
    # The judge prefers longer answers but adds 0.2 for whichever answer it reads first.
    def judge(prompts, a, b):
        return [min(1.0, (0.6 if len(x) > len(y) else 0.4 if len(x) < len(y) else 0.5) + 0.2) for x, y in zip(a, b)]

    source = PreferenceFunction(judge)
    raw = pairs.preference_matrix(source, ["p"], [["aa", "a", "aaa"]], symmetrize=False)
    assert raw[0, 0, 1] == pytest.approx(0.8) and raw[0, 1, 0] == pytest.approx(0.6)
    sym = pairs.preference_matrix(source, ["p"], [["aa", "a", "aaa"]])
    assert sym[0, 0, 1] == pytest.approx((0.8 + 1 - 0.6) / 2)
    np.testing.assert_allclose(sym + np.swapaxes(sym, 1, 2), 1.0)
    np.testing.assert_allclose(np.diagonal(sym, axis1=1, axis2=2), 0.5)
    np.testing.assert_allclose(pairs.win_rates(sym)[0], [np.mean(sym[0, k, [j for j in range(3) if j != k]])
                                                         for k in range(3)])


def test_preference_matrix_passes_each_pairs_token_ids_and_checks_shapes():
    seen = {}

    class Recorder:
        gives_rewards = False

        def preference(self, prompts, a, b, *, prompt_ids=None, ids_a=None, ids_b=None):
            seen.update(prompts=prompts, a=a, b=b, prompt_ids=prompt_ids, ids_a=ids_a, ids_b=ids_b)
            return np.full(len(a), 0.5)

    pairs.preference_matrix(Recorder(), ["p", "q"], [["a0", "a1"], ["b0", "b1"]], prompt_ids=[[1], [2]],
                            response_ids=[[[10], [11]], [[20], [21]]])
    assert seen["prompts"] == ["p", "p", "q", "q"] and seen["a"] == ["a0", "a1", "b0", "b1"]
    assert seen["b"] == ["a1", "a0", "b1", "b0"]
    assert seen["prompt_ids"] == [[1], [1], [2], [2]]
    assert seen["ids_a"] == [[10], [11], [20], [21]] and seen["ids_b"] == [[11], [10], [21], [20]]
    with pytest.raises(ValueError, match=r"same number of responses K, got \[1, 2\]"):
        pairs.preference_matrix(Recorder(), ["p", "q"], [["a"], ["b", "c"]])
    with pytest.raises(ValueError, match="2 prompts but 1 response lists"):
        pairs.preference_matrix(Recorder(), ["p", "q"], [["a", "b"]])
