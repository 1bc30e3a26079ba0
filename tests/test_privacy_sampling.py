"""Client sampling: Poisson inclusion at the charged rate, fixed-size samples, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.errors import PrivacyError
from fedpeft.privacy.sampling import sample_clients


def test_poisson_includes_each_client_at_the_charged_rate() -> None:
    """The fault this prevents: 20 of 100 nodes online, m = 10, every client picked at 0.5 while 0.1 was charged."""
    rng = np.random.default_rng(0)
    population = list(range(1000, 1020))  # 20 eligible nodes
    counts = np.zeros(20)
    rounds = 4000
    for _ in range(rounds):
        s = sample_clients(rng, population, 10, "poisson")
        assert s.rate == 0.5 and s.expected == 10 and s.population == 20
        counts[[c - 1000 for c in s.clients]] += 1
    freq = counts / rounds
    assert np.all(np.abs(freq - 0.5) < 4 * np.sqrt(0.25 / rounds))  # each client independently at q
    sizes = [len(sample_clients(rng, population, 10, "poisson").clients) for _ in range(2000)]
    assert 1.0 < np.std(sizes) < 3.0  # round sizes vary (binomial: std sqrt(20 * 0.25) = 2.24)


def test_poisson_with_fewer_eligible_than_wanted_takes_everyone() -> None:
    s = sample_clients(np.random.default_rng(0), [3, 5, 9], 10, "poisson")
    assert s.clients == [3, 5, 9] and s.rate == 1.0 and s.expected == 3


def test_fixed_size_draws_exactly_min_m_n_without_replacement() -> None:
    rng = np.random.default_rng(1)
    s = sample_clients(rng, list(range(50)), 10, "fixed")
    assert len(s.clients) == len(set(s.clients)) == 10 and s.rate == 0.2 and s.expected == 10
    # the same draw the server made before Poisson sampling existed (runs without client-level DP are unchanged)
    ref = sorted(int(i) for i in np.random.default_rng(1).choice(50, size=10, replace=False))
    assert s.clients == ref
    big = [2**63 + i for i in range(5)]  # real node ids are uint64: never passed through numpy floats
    assert sample_clients(rng, big, 2, "fixed").clients[0] in big


@pytest.mark.parametrize("population, wanted, scheme", [([], 3, "poisson"), ([1, 2], 0, "fixed"), ([1], 1, "x")])
def test_refuses_impossible_samples(population, wanted, scheme) -> None:
    with pytest.raises(PrivacyError):
        sample_clients(np.random.default_rng(0), population, wanted, scheme)
