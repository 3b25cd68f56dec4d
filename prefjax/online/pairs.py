"""K scored samples per prompt -> training examples: pairs, win rates, ties (pure numpy).

    chosen, rejected, valid = best_worst(rewards_NxK)            # West-of-N / online DPO pairs
    chosen, rejected, valid = random_pair(rewards_NxK, rng)       # two random samples, ordered
    best, valid = best_only(rewards_NxK)                          # rejection-sampling SFT rows
    P = preference_matrix(source, prompts, responses_NxK, prompt_ids=..., response_ids=...)
    p_hat = win_rates(P)                                          # SPPO's P(y_k > pi_t) estimates
    tie_fraction(rewards_NxK)                                     # prompts with nothing to learn

A row whose rewards all tie gives no preference: it is marked invalid (valid[n] = False), and
its indices are still in range so callers can index with them and mask. NaN rewards (unknown,
e.g. in a reloaded store) are left out of every comparison; a row with fewer than two finite
rewards is invalid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from prefjax.online.rewards import RewardSource

Triple = tuple[np.ndarray, np.ndarray, np.ndarray]  # chosen [N] int, rejected [N] int, valid [N] bool


def _matrix(rewards: Any, name: str = "rewards") -> np.ndarray:
    array = np.asarray(rewards, np.float64)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"{name} must be [N prompts, K >= 1 samples], got shape {list(array.shape)}")
    return array


def best_worst(rewards: Any) -> Triple:
    """(argmax, argmin, max > min) per row of rewards [N, K]; ties go to the earliest index (the
    samples are drawn at random, so that is a random choice among them)."""
    r = _matrix(rewards)
    finite = np.isfinite(r)
    # NaN never wins: it is -inf for the best and +inf for the worst.
    chosen = np.argmax(np.where(finite, r, -np.inf), axis=1)
    rejected = np.argmin(np.where(finite, r, np.inf), axis=1)
    rows = np.arange(len(r))
    valid = (finite.sum(axis=1) >= 2) & (r[rows, chosen] > r[rows, rejected])
    return chosen.astype(np.int64), rejected.astype(np.int64), valid


def best_only(rewards: Any) -> tuple[np.ndarray, np.ndarray]:
    """(the best sample [N], valid [N]): valid where it beats the row's worst, so a row whose
    samples all tie (all right or all wrong) teaches nothing and is left out."""
    chosen, _, valid = best_worst(rewards)
    return chosen, valid


def random_pair(rewards: Any, rng: np.random.Generator) -> Triple:
    """Two distinct samples per row drawn uniformly by `rng`, the higher-rewarded one chosen; a
    tie (or a NaN reward) is invalid. Needs K >= 2. The same rng state gives the same pairs."""
    r = _matrix(rewards)
    n, k = r.shape
    if k < 2:
        raise ValueError(f"random_pair needs at least 2 samples per prompt, got rewards of shape {[n, k]}")
    first = rng.integers(0, k, size=n)
    second = rng.integers(0, k - 1, size=n)
    second = second + (second >= first)  # uniform over the K - 1 other samples
    rows = np.arange(n)
    r_first, r_second = r[rows, first], r[rows, second]
    first_wins = r_first > r_second
    chosen = np.where(first_wins, first, second).astype(np.int64)
    rejected = np.where(first_wins, second, first).astype(np.int64)
    valid = np.isfinite(r_first) & np.isfinite(r_second) & (r_first != r_second)
    return chosen, rejected, valid


def tie_fraction(rewards: Any) -> float:
    """The fraction of rows (prompts) whose rewards all tie (fewer than two finite ones count as a
    tie: nothing to compare); 0.0 for no rows."""
    r = _matrix(rewards)
    if len(r) == 0:
        return 0.0
    return float(1.0 - best_worst(r)[2].mean())


def win_rates(preference: Any) -> np.ndarray:
    """[N, K]: P_hat(y_k) = mean over j != k of P(y_k > y_j), from preference [N, K, K] (SPPO's
    estimate of P(y_k beats the policy), from the other K - 1 samples). Needs K >= 2."""
    p = np.asarray(preference, np.float64)
    if p.ndim != 3 or p.shape[1] != p.shape[2] or p.shape[1] < 2:
        raise ValueError(f"preference must be [N, K, K] with K >= 2, got shape {list(p.shape)}")
    k = p.shape[1]
    off_diagonal = p.sum(axis=2) - np.diagonal(p, axis1=1, axis2=2)
    return off_diagonal / (k - 1)


def preference_matrix(source: RewardSource, prompts: Sequence[Any], responses: Sequence[Sequence[str]], *,
                      prompt_ids: Sequence[Sequence[int]] | None = None,
                      response_ids: Sequence[Sequence[Sequence[int]]] | None = None,
                      symmetrize: bool = True) -> np.ndarray:
    """[N, K, K]: P(responses[n][a] > responses[n][b]) for every ordered pair a != b, from one call
    to source.preference; the diagonal is 0.5.

    `symmetrize` averages each pair's two orders, P[a, b] = (p(a, b) + 1 - p(b, a)) / 2, so the
    matrix satisfies P[a, b] + P[b, a] = 1 even for a judge that favours the first (or second)
    position; a Bradley-Terry source already does, and is unchanged.
    """
    n = len(prompts)
    if len(responses) != n or (prompt_ids is not None and len(prompt_ids) != n) or (
            response_ids is not None and len(response_ids) != n):
        raise ValueError(f"{n} prompts but {len(responses)} response lists"
                         + ("" if prompt_ids is None else f", {len(prompt_ids)} prompt_ids")
                         + ("" if response_ids is None else f", {len(response_ids)} response_ids lists"))
    ks = {len(group) for group in responses}
    if len(ks) > 1:
        raise ValueError(f"every prompt needs the same number of responses K, got {sorted(ks)}")
    k = ks.pop() if ks else 0
    out = np.full((n, k, k), 0.5)
    a_idx, b_idx = (x.ravel() for x in np.nonzero(~np.eye(k, dtype=bool)))  # ordered pairs a != b
    if n == 0 or a_idx.size == 0:
        return out
    rows = np.repeat(np.arange(n), a_idx.size)
    a_all, b_all = np.tile(a_idx, n), np.tile(b_idx, n)
    p = source.preference(
        [prompts[i] for i in rows], [responses[i][a] for i, a in zip(rows, a_all)],
        [responses[i][b] for i, b in zip(rows, b_all)],
        prompt_ids=None if prompt_ids is None else [prompt_ids[i] for i in rows],
        ids_a=None if response_ids is None else [response_ids[i][a] for i, a in zip(rows, a_all)],
        ids_b=None if response_ids is None else [response_ids[i][b] for i, b in zip(rows, b_all)])
    out[rows, a_all, b_all] = np.asarray(p, np.float64)
    if symmetrize:
        out = 0.5 * (out + 1.0 - np.swapaxes(out, 1, 2))  # the diagonal stays 0.5
    return out
