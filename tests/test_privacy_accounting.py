"""Accounting checked against an independent accountant (Google's dp_accounting), and the one-run audit statistics."""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedpeft.errors import PrivacyError
from fedpeft.privacy.accounting import ClientLevelAccountant
from fedpeft.privacy.epsilon_audit import (
    NOISE_GRID,
    NoiseFamily,
    epsilon_from_guesses,
    epsilon_lower_bound,
    gaussian_profile,
    p_value,
    profile_p_value,
)

DELTA = 1e-5


ORDERS = [*range(2, 65), 80, 96, 128, 192, 256]  # integer orders: dp_accounting's fractional ones are slow


def _independent(events: list[dpa.DpEvent], relation: dpa.NeighboringRelation, kind: str) -> float:
    if kind == "rdp":
        acc = rdp.RdpAccountant(orders=ORDERS, neighboring_relation=relation)
    else:
        acc = pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=1e-3)
    acc.compose(dpa.ComposedDpEvent(events))
    return acc.get_epsilon(DELTA)


@pytest.mark.parametrize("kind, rel", [("rdp", 0.0), ("prv", 0.02)])
def test_poisson_with_per_round_rates_matches_an_independent_accountant(kind: str, rel: float) -> None:
    """Rounds with different eligible populations compose: the per-round q's, RDP and PRV (PLD as reference)."""
    rates = [0.1] * 30 + [0.5] * 10 + [0.2] * 20
    ours = ClientLevelAccountant(kind)
    for q in rates:
        ours.step(1.1, q)
    events = [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(1.1)), n)
              for q, n in ((0.1, 30), (0.5, 10), (0.2, 20))]
    theirs = _independent(events, dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, "rdp" if kind == "rdp" else "pld")
    if kind == "rdp":  # the same RDP curve at the same orders; our finer default grid may only lower epsilon
        same_orders = ours._acc.get_privacy_spent(delta=DELTA, alphas=ORDERS)[0]
        assert same_orders == pytest.approx(theirs, rel=1e-6)
        assert theirs * 0.95 <= ours.epsilon(DELTA) <= theirs
    else:
        assert ours.epsilon(DELTA) == pytest.approx(theirs, rel=rel)
    assert ours.history == [(1.1, 0.1, 30), (1.1, 0.5, 10), (1.1, 0.2, 20)]


def test_undercharged_rate_is_visible() -> None:
    """The fault the accountant must not hide: 20 of 100 nodes online, 10 sampled, is q = 0.5, not 0.1."""
    wrong, right = ClientLevelAccountant("rdp"), ClientLevelAccountant("rdp")
    for _ in range(100):
        wrong.step(1.0, 10 / 100)
        right.step(1.0, 10 / 20)
    assert wrong.epsilon(DELTA) == pytest.approx(7.90, abs=0.01)
    assert right.epsilon(DELTA) > 40


@pytest.mark.parametrize("z, m, n, rounds", [(1.0, 10, 100, 100), (2.0, 5, 1000, 200), (1.5, 30, 200, 40)])
def test_fixed_size_sampling_matches_the_independent_replace_one_accountant(z, m, n, rounds) -> None:
    """Fixed-size sampling without replacement, replace-one relation: the clipped sum's sensitivity is 2C, so the
    independent accountant sees a Gaussian of noise multiplier z/2 relative to its sensitivity."""
    ours = ClientLevelAccountant("rdp", sampling="fixed")
    for _ in range(rounds):
        ours.step(z, m / n)
    event = dpa.SampledWithoutReplacementDpEvent(n, m, dpa.GaussianDpEvent(z / 2))
    acc = rdp.RdpAccountant(orders=ORDERS, neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SelfComposedDpEvent(event, rounds))
    theirs = acc.get_epsilon(DELTA)
    assert theirs <= ours.epsilon(DELTA) <= theirs * 1.01  # ours may only be the more conservative
    poisson = ClientLevelAccountant("rdp")
    for _ in range(rounds):
        poisson.step(z, m / n)
    assert ours.epsilon(DELTA) > poisson.epsilon(DELTA)  # replace-one with 2C sensitivity costs more


def test_fixed_size_state_round_trip_and_refusals() -> None:
    acc = ClientLevelAccountant("rdp", sampling="fixed")
    acc.step(1.0, 0.1)
    again = ClientLevelAccountant("rdp", sampling="fixed")
    again.load_state_dict(acc.state_dict())
    assert again.epsilon(DELTA) == acc.epsilon(DELTA)
    with pytest.raises(PrivacyError, match="sampling"):
        ClientLevelAccountant("rdp").load_state_dict(acc.state_dict())
    with pytest.raises(PrivacyError, match="RDP only"):
        ClientLevelAccountant("prv", sampling="fixed")
    with pytest.raises(PrivacyError, match="unknown client sampling"):
        ClientLevelAccountant("rdp", sampling="shuffle")


def test_p_value_is_the_binomial_tail_without_delta() -> None:
    # 8 of 10 right under eps = 0: P[Bin(10, 1/2) >= 8] = (45 + 10 + 1) / 1024
    assert p_value(100, 10, 8, 0.0) == pytest.approx(56 / 1024)
    q = 1 / (1 + math.exp(-1.0))
    assert p_value(100, 3, 3, 1.0) == pytest.approx(q**3)
    assert p_value(100, 3, 3, 1.0, delta=1e-3) > q**3  # the delta term only adds


def test_epsilon_from_guesses_inverts_the_p_value() -> None:
    eps = epsilon_from_guesses(1000, 200, 190, 0.0, 0.05)
    assert p_value(1000, 200, 190, eps) < 0.05 <= p_value(1000, 200, 190, eps + 1e-3)
    assert epsilon_from_guesses(1000, 200, 100, 0.0, 0.05) == 0.0  # chance accuracy refutes nothing


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 4.0])
def test_lower_bound_never_exceeds_the_epsilon_of_randomized_response(eps: float) -> None:
    """eps-DP randomized response on the inclusion coins: the bound stays below eps and is not vacuous."""
    bounds = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        inc = rng.random(1000) < 0.5
        flip = rng.random(1000) < 1 / (1 + math.exp(eps))
        scores = (inc ^ flip) + 1e-3 * rng.random(1000)
        bounds.append(epsilon_lower_bound(scores, inc, PURE_DP).epsilon_lower_bound)
    assert max(bounds) <= eps
    assert np.mean(bounds) >= 0.4 * eps


#: pure DP indexed like a noise multiplier: "noise" s claims (1/s, 0)-DP at every delta
PURE_DP = NoiseFamily(lambda s: [(1.0 / s, 0.0)], lambda s: 1.0 / s)


@pytest.mark.parametrize("mu", [0.25, 1.0, 3.0])
def test_the_gaussian_profile_is_the_independent_accountants(mu: float) -> None:
    """The exact profile the audit tests a q = 1 run against equals dp_accounting's Gaussian PLD."""
    ref = pld.privacy_loss_distribution.from_gaussian_mechanism(standard_deviation=1 / mu, sensitivity=1.0,
                                                                value_discretization_interval=1e-4)
    for eps, delta in gaussian_profile(mu, [0.0, 0.5, 1.0, 2.0, 4.0]):
        assert delta == pytest.approx(ref.get_delta_for_epsilon(eps), rel=1e-6, abs=1e-12)


def test_the_profile_p_value_is_the_smallest_pair_p_value() -> None:
    pairs = [(3.0, 1e-6), (1.0, 0.05), (0.5, 0.2)]
    assert profile_p_value(1000, 200, 150, pairs) == min(p_value(1000, 200, 150, e, d) for e, d in pairs)
    assert profile_p_value(1000, 200, 150, [(math.inf, 0.0)]) == 1.0  # an infinite claim refutes nothing


def test_the_family_bound_reads_the_smallest_refuted_noise() -> None:
    """190 of 200 right refutes pure eps = 1 (p ~ 1e-12) but not eps = 4: the bound lands in between, on the
    noise grid, and the noise bound is the grid point whose claim was refuted."""
    bound = epsilon_lower_bound(np.r_[np.ones(100), np.zeros(100)], np.r_[np.ones(95), np.zeros(100), np.ones(5)]
                                .astype(bool), PURE_DP, guess_sizes=(100,))
    assert 1.0 < bound.epsilon_lower_bound < 4.0 and bound.correct == 190
    assert bound.epsilon_lower_bound == pytest.approx(1 / bound.noise_bound)
    alpha = 0.05
    assert p_value(200, 200, 190, bound.epsilon_lower_bound) < alpha
    assert p_value(200, 200, 190, 1 / NOISE_GRID[NOISE_GRID.index(bound.noise_bound) - 1]) >= alpha


def test_lower_bound_rejects_bad_input() -> None:
    with pytest.raises(PrivacyError):
        epsilon_lower_bound([0.1, float("nan")], [True, False], PURE_DP)
    with pytest.raises(PrivacyError):
        epsilon_lower_bound([0.1, 0.2], [True], PURE_DP)
