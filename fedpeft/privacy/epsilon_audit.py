"""The statistics of a one-run privacy audit (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1)
Training Run"), tested against the whole privacy profile the accountant claims.

m canaries are each included in the training run by an independent fair coin. After the run an auditor
scores every canary (higher = "looks included"), guesses "in" for the k highest scores and "out" for the
k lowest, and abstains on the rest. If the run is (eps, delta)-DP, the number of correct guesses among the
r = 2k made is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta term
(:func:`p_value`, the paper's Theorem 3.1), so many correct guesses refute small epsilons.

An accountant claims more than one (eps, delta) pair: it claims its whole privacy profile, every pair
(eps(d), d). A run that claims all of them is refuted as soon as one pair is, so the p-value of the
observed guesses is the smallest of the pairs' p-values (:func:`profile_p_value`). Testing a Gaussian
mechanism's profile instead of its single pair at the reported delta makes the audit several times tighter:
most of a Gaussian's leakage sits at moderate epsilon and large delta, where one pair cannot see it.

The bound is then stated within the family of mechanisms the run belongs to: "this run (same rounds, same
sampling rates) with noise multiplier s" (:class:`NoiseFamily`), each member with the tightest profile
known for it: exact Gaussian-DP (:func:`gaussian_profile`) when every client is in every round, the
accountant's RDP profile otherwise. :func:`epsilon_lower_bound`
finds the smallest noise multiplier s* the guesses refute -- the noise actually added is, at 95% confidence,
below s* -- and reports the accountant's epsilon at s* as the lower bound. Above the claimed epsilon, it is
a privacy bug.

The guess sizes are fixed before the scores are seen; trying several is paid for with a Bonferroni
correction (each is tested at ``(1 - confidence) / len(guess_sizes)``), so the bound keeps its confidence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import binom, norm

from fedpeft.errors import PrivacyError

#: the deltas at which an accountant's profile is read when no closed form is known
PROFILE_DELTAS = tuple(10.0 ** -e for e in np.arange(0.25, 10.25, 0.25))
#: noise multipliers the family search spans (log-spaced; the bound is read off this grid)
NOISE_GRID = tuple(float(s) for s in np.geomspace(0.02, 200.0, 481))

Profile = Sequence[tuple[float, float]]


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP with m canaries (the paper's Theorem 3.1
    bound, with its delta term 2 m delta max_i P[v - i <= Binomial < v] / i)."""
    if not (0 <= v <= r <= m and epsilon >= 0 and 0 <= delta <= 1):
        raise PrivacyError(f"p_value needs 0 <= v <= r <= m, epsilon >= 0, delta in [0, 1]: got m={m}, r={r}, "
                           f"v={v}, epsilon={epsilon}, delta={delta}")
    if math.isinf(epsilon):
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, tail)
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v - i <= B < v] for i = 1..v
    worst = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * worst)


def profile_p_value(m: int, r: int, v: int, profile: Profile) -> float:
    """P[at least v of r guesses correct] for a mechanism that is (eps, delta)-DP for every pair of
    ``profile`` at once: the smallest of the pairs' :func:`p_value` bounds."""
    return min((p_value(m, r, v, e, d) for e, d in profile), default=1.0)


def epsilon_from_guesses(m: int, r: int, v: int, delta: float, alpha: float) -> float:
    """The largest epsilon whose single-pair p-value for (m, r, v) at ``delta`` is below ``alpha`` (0 when
    none is): the classic one-run bound, for a claim that is one (epsilon, delta) pair."""
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


def gaussian_profile(mu: float, epsilons: Sequence[float] = tuple(np.linspace(0.0, 20.0, 201))) -> Profile:
    """The exact privacy profile of a mu-Gaussian-DP mechanism (a Gaussian mechanism of sensitivity 1 and
    noise 1/mu, or T of them composed, mu = sqrt(T)/noise; Balle & Wang 2018, Dong, Roth & Su 2022):
    delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu), as (eps, delta) pairs on ``epsilons``."""
    if not mu > 0:
        raise PrivacyError(f"mu must be > 0, got {mu}")
    e = np.asarray(epsilons, dtype=np.float64)
    delta = norm.cdf(mu / 2 - e / mu) - np.exp(e + norm.logcdf(-mu / 2 - e / mu))
    return [(float(a), float(min(1.0, max(0.0, b)))) for a, b in zip(e, delta, strict=True)]


class NoiseFamily:
    """The audited run's family of mechanisms indexed by noise multiplier s: ``profile_at(s)`` is a valid
    privacy profile of this run (same rounds, same sampling rates) had its noise been s -- the tighter the
    more the audit refutes -- and ``epsilon_at(s)`` the accountant's epsilon at the reported delta."""

    def __init__(self, profile_at: Callable[[float], Profile], epsilon_at: Callable[[float], float]) -> None:
        self._profile_at = profile_at
        self._epsilon_at = epsilon_at
        self._profiles: dict[float, Profile] = {}

    def profile(self, noise: float) -> Profile:
        """The (epsilon, delta) pairs claimed at noise multiplier ``noise`` (computed once per noise)."""
        if noise not in self._profiles:
            self._profiles[noise] = [(max(0.0, float(e)), float(d)) for e, d in self._profile_at(noise)]
        return self._profiles[noise]

    def epsilon(self, noise: float) -> float:
        """The accountant's epsilon at the reported delta for noise multiplier ``noise``."""
        return float(self._epsilon_at(noise))


@dataclass(frozen=True)
class AuditBound:
    """The best guess of an audit, the epsilon lower bound it gives, and the noise bound behind it
    (``noise_bound``: at the audit's confidence the noise multiplier actually added is below it; inf when
    the guesses refute no noise multiplier, the grid's smallest when they refute all)."""

    epsilon_lower_bound: float
    noise_bound: float
    canaries: int
    guesses: int
    correct: int
    k_pos: int
    k_neg: int


def _smallest_refuted(m: int, r: int, v: int, family: NoiseFamily, alpha: float) -> float:
    """The smallest noise multiplier on :data:`NOISE_GRID` whose claimed profile the guesses refute at
    ``alpha`` (inf if none is). Refutation is monotone: more noise claims less leakage, easier to refute."""
    grid = NOISE_GRID
    if profile_p_value(m, r, v, family.profile(grid[-1])) >= alpha:
        return math.inf
    if profile_p_value(m, r, v, family.profile(grid[0])) < alpha:
        return grid[0]
    lo, hi = 0, len(grid) - 1  # not refuted at lo, refuted at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if profile_p_value(m, r, v, family.profile(grid[mid])) < alpha else (mid, hi)
    return grid[hi]


def epsilon_lower_bound(scores: ArrayLike, included: ArrayLike, family: NoiseFamily, confidence: float = 0.95,
                        guess_sizes: Sequence[int] = (10, 30, 100, 300, 1000, 3000, 10000)) -> AuditBound:
    """Lower bound on the run's epsilon from canary scores and the coins that included them.

    For each k in ``guess_sizes`` (capped at m/2) the auditor guesses "in" for the k highest and "out" for
    the k lowest scores. Each k refutes every noise multiplier from some s* up; the smallest s* over the
    k's (each tested at the Bonferroni level) bounds the noise actually added, and ``family.epsilon(s*)``
    is the epsilon lower bound.
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
    tried = []
    for k in sizes:
        correct = int(inc[order[:k]].sum() + (~inc[order[m - k:]]).sum())
        tried.append((_smallest_refuted(m, 2 * k, correct, family, alpha), k, correct))
    noise, k, correct = min(tried)  # the smallest refuted noise: the largest epsilon
    eps = 0.0 if math.isinf(noise) else family.epsilon(noise)
    return AuditBound(eps, noise, m, 2 * k, correct, k, k)
