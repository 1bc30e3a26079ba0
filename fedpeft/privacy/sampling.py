"""Client sampling as the accountant describes it.

The server samples each round from the clients actually eligible then (in a deployment: the nodes
connected that round; in a simulation: every virtual client), and the accountant is charged that round's
real rate. Two schemes:

- ``poisson``: every eligible client joins independently with probability ``q = min(1, m / N)``; the round
  size varies, and client-level DP divides by the expected size ``q N`` (DP-FedAvg). Add/remove relation.
- ``fixed``: ``min(m, N)`` clients uniformly without replacement (what runs without client-level DP use);
  under client-level DP it is accounted with the replace-one bound (:mod:`fedpeft.privacy.accounting`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpeft.errors import PrivacyError

SCHEMES = ("poisson", "fixed")


@dataclass(frozen=True)
class ClientSample:
    """One round's sample: the chosen clients, the per-client rate and the expected round size."""

    clients: list[int]
    rate: float
    expected: float
    population: int


def sample_clients(rng: np.random.Generator, population: Sequence[int], wanted: int, scheme: str) -> ClientSample:
    """Sample from ``population`` (sorted ids) for a planned round size ``wanted``."""
    n = len(population)
    if scheme not in SCHEMES:
        raise PrivacyError(f"unknown client sampling {scheme!r}; known: {', '.join(SCHEMES)}")
    if n == 0 or wanted < 1:
        raise PrivacyError(f"cannot sample {wanted} of {n} eligible clients")
    if scheme == "poisson":
        q = min(1.0, wanted / n)
        chosen = np.flatnonzero(rng.random(n) < q)
        return ClientSample(sorted(int(population[int(i)]) for i in chosen), q, q * n, n)
    k = min(wanted, n)
    # draw indices, not ids: real node ids are random uint64 values that numpy would turn into floats
    picked = rng.choice(n, size=k, replace=False)
    return ClientSample(sorted(int(population[int(i)]) for i in picked), k / n, float(k), n)
