"""The statistics of a one-run privacy audit (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1)
Training Run").

m canaries are each included in the training run by an independent fair coin. After the run an auditor
scores every canary (higher = "looks included"), guesses "in" for the k+ highest scores and "out" for the
k- lowest, and abstains on the rest. If the run is (eps, delta)-DP, the number of correct guesses among the
r = k+ + k- made is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta term, so many
correct guesses refute small epsilons. :func:`epsilon_lower_bound` returns the largest epsilon refuted at
the given confidence: a lower bound on the true epsilon. Above the epsilon the accountant claims, it is a
privacy bug.

The guess sizes are fixed before the scores are seen; trying several is paid for with a Bonferroni
correction (each is tested at ``(1 - confidence) / len(guess_sizes)``), so the bound keeps its confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import binom

from fedpeft.errors import PrivacyError


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP with m canaries (the paper's Theorem 3.1
    bound, with its delta term 2 m delta max_i P[v - i <= Binomial < v] / i)."""
    if not (0 <= v <= r <= m and epsilon >= 0 and 0 <= delta <= 1):
        raise PrivacyError(f"p_value needs 0 <= v <= r <= m, epsilon >= 0, delta in [0, 1]: got m={m}, r={r}, "
                           f"v={v}, epsilon={epsilon}, delta={delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, tail)
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v - i <= B < v] for i = 1..v
    worst = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * worst)


def epsilon_from_guesses(m: int, r: int, v: int, delta: float, alpha: float) -> float:
    """The largest epsilon whose p-value for (m, r, v) is below ``alpha`` (0 when none is)."""
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < alpha else (lo, mid)
    return lo


@dataclass(frozen=True)
class AuditBound:
    """The best guess of an audit and the epsilon lower bound it gives."""

    epsilon_lower_bound: float
    canaries: int
    guesses: int
    correct: int
    k_pos: int
    k_neg: int


def epsilon_lower_bound(scores: ArrayLike, included: ArrayLike, delta: float,
                        confidence: float = 0.95, guess_sizes: Sequence[int] = (10, 25, 50, 100, 200)) -> AuditBound:
    """Lower bound on epsilon from canary scores and the coins that included them.

    For each k in ``guess_sizes`` (capped at m/2) the auditor guesses "in" for the k highest and "out" for
    the k lowest scores; the best k's bound is returned, each tested at the Bonferroni level.
    """
    s, inc = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1 or not len(s):
        raise PrivacyError(f"scores and included must be equal-length 1-d sequences, got {s.shape}, {inc.shape}")
    if not np.all(np.isfinite(s)):
        raise PrivacyError("canary scores must be finite")
    if not 0 < confidence < 1:
        raise PrivacyError(f"confidence must be in (0, 1), got {confidence}")
    m = len(s)
    sizes = sorted({min(int(k), m // 2) for k in guess_sizes if k >= 1} - {0})
    if not sizes:
        raise PrivacyError(f"need at least 2 canaries and a guess size >= 1, got m={m}, sizes={guess_sizes}")
    alpha = (1 - confidence) / len(sizes)
    order = np.argsort(-s, kind="stable")
    best = AuditBound(0.0, m, 0, 0, 0, 0)
    for k in sizes:
        correct = int(inc[order[:k]].sum() + (~inc[order[m - k:]]).sum())
        eps = epsilon_from_guesses(m, 2 * k, correct, delta, alpha)
        if eps > best.epsilon_lower_bound or best.guesses == 0:
            best = AuditBound(eps, m, 2 * k, correct, k, k)
    return best
