"""Client-level DP, accounting and the up-front privacy checks (no models; fast)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedpeft.config import PrivacySection
from fedpeft.errors import PayloadError, PrivacyError
from fedpeft.privacy import (
    AdaptiveClipper,
    ClientLevelAccountant,
    add_server_noise,
    check_privacy,
    clip_to_norm,
    clip_update,
    dp_average,
    global_norm,
    update_noise_multiplier,
)


def _delta(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A": torch.randn(8, 32, generator=g) * scale, "a.lora_B": torch.randn(32, 8, generator=g) * scale,
            "head.bias": torch.randn(5, generator=g) * scale}


# ----------------------------------------------------------------------------- clipping

def test_clip_update_bounds_norm_and_keeps_direction() -> None:
    d = _delta(scale=1.0)
    norm = global_norm(d)
    clipped, pre = clip_update(d, clip_norm=norm / 4)
    assert pre == pytest.approx(norm)
    assert global_norm(clipped) == pytest.approx(norm / 4, rel=1e-6)
    for k in d:
        assert torch.allclose(clipped[k], d[k] / 4, atol=1e-6)
    # under the bound: unchanged (and a copy)
    same, pre2 = clip_update(d, clip_norm=norm * 2)
    assert pre2 == pytest.approx(norm)
    assert all(torch.equal(same[k], d[k]) and same[k] is not d[k] for k in d)


def test_clip_to_norm_after_ternary_decode() -> None:
    # ComPEFT-style ternary code of a clipped update: keep the top half by magnitude as sign * alpha * std.
    # Its norm is alpha * std * sqrt(k), which exceeds the clip for alpha > ~1.4: the bound applied
    # before encoding no longer holds for what is sent, so clip_to_norm must run after encode -> decode.
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    clipped, _ = clip_update({"w": x}, clip_norm=1.0)
    w = clipped["w"]
    keep = w.abs() >= w.abs().median()
    decoded = {"w": torch.sign(w) * keep * 2.0 * w.std()}
    assert global_norm(clipped) <= 1.0 + 1e-6
    assert global_norm(decoded) > 1.3
    sent = clip_to_norm(decoded, 1.0)
    assert global_norm(sent) <= 1.0 + 1e-6
    assert torch.equal(torch.sign(sent["w"]), torch.sign(decoded["w"]))   # same code, smaller scale


def test_clip_rejects_non_finite_and_bad_norm() -> None:
    with pytest.raises(PayloadError):
        clip_update({"w": torch.tensor([1.0, float("nan")])}, 1.0)
    with pytest.raises(PayloadError):
        clip_to_norm({"w": torch.tensor([float("inf")])}, 1.0)
    with pytest.raises(PrivacyError):
        clip_update(_delta(), 0.0)


def test_dp_average_uses_fixed_denominator() -> None:
    ups = [_delta(1), _delta(2)]
    avg = dp_average(ups, expected_clients=4)
    for k in ups[0]:
        assert torch.allclose(avg[k], (ups[0][k] + ups[1][k]) / 4)
    with pytest.raises(PayloadError):
        dp_average([_delta(1), {"other": torch.zeros(1)}], expected_clients=2)


# ----------------------------------------------------------------------------- server noise

@pytest.mark.parametrize("z,clip,m", [(1.0, 1.0, 10), (0.7, 0.3, 4), (2.5, 5.0, 100)])
def test_server_noise_std_is_z_c_over_m(z: float, clip: float, m: int) -> None:
    n = 200_000
    mean = {"x": torch.zeros(n // 2), "y": torch.zeros(n // 2)}
    noisy = add_server_noise(mean, clip, z, m, torch.Generator().manual_seed(1))
    flat = torch.cat([noisy["x"], noisy["y"]]).double()
    expected = z * clip / m
    # std of the sample std ~ expected / sqrt(2n) = 0.16 %; allow 1 %
    assert flat.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(flat.mean().item()) < 5 * expected / math.sqrt(n)


def test_server_noise_is_added_to_the_mean_and_reproducible() -> None:
    mean = _delta(3)
    a = add_server_noise(mean, 1.0, 1.0, 5, torch.Generator().manual_seed(7))
    b = add_server_noise(dict(reversed(list(mean.items()))), 1.0, 1.0, 5, torch.Generator().manual_seed(7))
    for k in mean:
        assert torch.equal(a[k], b[k])                     # key order does not change the draws
        assert not torch.equal(a[k], mean[k])
    zero = add_server_noise(mean, 1.0, 0.0, 5, torch.Generator())
    assert all(torch.equal(zero[k], mean[k]) for k in mean)


# ----------------------------------------------------------------------------- adaptive clipping

def test_adaptive_noise_split_composes_to_the_budget() -> None:
    z, sigma_b = 1.0, 2.0
    z_delta = update_noise_multiplier(z, sigma_b)
    assert z_delta > z
    assert (z_delta ** -2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    with pytest.raises(PrivacyError, match="count noise"):
        update_noise_multiplier(1.0, 0.2)            # m = 4 clients: sigma_b = 4/20 cannot pay for z = 1


def test_adaptive_clipper_tracks_the_target_quantile() -> None:
    g = torch.Generator().manual_seed(0)
    clipper = AdaptiveClipper(0.05, expected_clients=200, noise_multiplier=1.0, target_quantile=0.3, lr=0.2)
    for _ in range(150):
        norms = torch.empty(200).exponential_(1.0, generator=g)        # fixed update-norm distribution
        clipper.update([AdaptiveClipper.indicator(float(n), clipper.clip_norm) for n in norms], g)
    true_quantile = -math.log(1 - 0.3)                                  # 30 % quantile of Exp(1)
    assert clipper.clip_norm == pytest.approx(true_quantile, rel=0.15)


def test_adaptive_clipper_state_round_trip() -> None:
    a = AdaptiveClipper(1.0, expected_clients=40, noise_multiplier=1.0)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        a.update([1.0] * 30 + [0.0] * 10, g)
    b = AdaptiveClipper(9.0, expected_clients=1, noise_multiplier=0.0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    ga, gb = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert a.update([1.0] * 20, ga) == b.update([1.0] * 20, gb)
    assert b.update_noise_multiplier == a.update_noise_multiplier
    with pytest.raises(PayloadError):
        a.update([0.5], ga)


# ----------------------------------------------------------------------------- accounting

@pytest.mark.parametrize("q,z,rounds", [(0.1, 1.0, 100), (0.04, 0.8, 37), (1.0, 1.5, 20)])
def test_rdp_epsilon_equals_opacus(q: float, z: float, rounds: int) -> None:
    acc = ClientLevelAccountant("rdp")
    for _ in range(rounds):
        acc.step(z, q)
    ref = RDPAccountant()
    ref.history = [(z, q, rounds)]
    assert acc.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    assert acc.rounds == rounds


def test_prv_epsilon_equals_opacus() -> None:
    acc = ClientLevelAccountant("prv")
    for _ in range(50):
        acc.step(1.0, 0.1)
    ref = PRVAccountant()
    ref.history = [(1.0, 0.1, 50)]
    assert acc.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    rdp = ClientLevelAccountant("rdp")
    for _ in range(50):
        rdp.step(1.0, 0.1)
    assert acc.epsilon(1e-5) < rdp.epsilon(1e-5)          # PRV is the tighter accountant


def test_epsilon_is_monotone_in_rounds() -> None:
    acc = ClientLevelAccountant("rdp")
    eps = []
    for r in range(30):
        acc.step(1.0, 0.2)
        if r % 3 == 0:
            eps.append(acc.epsilon(1e-5))
    assert all(b > a for a, b in zip(eps, eps[1:]))
    assert ClientLevelAccountant("rdp").epsilon(1e-5) == 0.0


def test_state_dict_round_trip_continues_the_same_curve() -> None:
    straight, first = ClientLevelAccountant("rdp"), ClientLevelAccountant("rdp")
    schedule = [(1.0, 0.1)] * 40 + [(1.2, 0.1)] * 20 + [(1.2, 0.05)] * 40
    for z, q in schedule:
        straight.step(z, q)
    for z, q in schedule[:50]:
        first.step(z, q)
    saved = json.dumps(first.state_dict())                 # plain JSON, no pickle
    resumed = ClientLevelAccountant("rdp")
    resumed.load_state_dict(json.loads(saved))
    for z, q in schedule[50:]:
        resumed.step(z, q)
    assert resumed.history == straight.history
    assert resumed.epsilon(1e-5) == straight.epsilon(1e-5)
    with pytest.raises(PrivacyError):
        ClientLevelAccountant("prv").load_state_dict(json.loads(saved))
    with pytest.raises(PrivacyError):
        resumed.load_state_dict({"kind": "rdp", "history": [[1.0, 1.5, 3]]})


def test_sampling_amplification() -> None:
    full, sampled = ClientLevelAccountant("rdp"), ClientLevelAccountant("rdp")
    for _ in range(100):
        full.step(1.0, 1.0)       # every client every round: what Flower's fixed accountant assumes
        sampled.step(1.0, 0.1)    # 10 % of the clients per round
    eps_full, eps_sampled = full.epsilon(1e-5), sampled.epsilon(1e-5)
    assert eps_full == pytest.approx(96, rel=0.02)
    assert eps_sampled < eps_full / 10


# ----------------------------------------------------------------------------- check_privacy

def _cfg(**kw: object) -> PrivacySection:
    return PrivacySection(**kw)  # type: ignore[arg-type]


GOOD = dict(num_clients=100, clients_per_round=10, rounds=50, min_local_examples=500)


@pytest.mark.parametrize("cfg,kw,match", [
    (_cfg(mode="local", delta=0.01), {}, r"delta = 0.01 is >= 1/N = 1/500"),
    (_cfg(mode="client", delta=0.02), {}, r"1/N = 1/100"),
    (_cfg(mode="both", delta=0.0), {}, "delta must be > 0"),
    (_cfg(mode="local", noise_multiplier=0.0), {}, "noise_multiplier = 0"),
    (_cfg(mode="client", server_noise_multiplier=0.0), {}, "server_noise_multiplier = 0"),
    (_cfg(mode="client", clip_norm=0.0), {}, "clip_norm must be > 0"),
    (_cfg(mode="local", max_grad_norm=0.0), {}, "max_grad_norm must be > 0"),
    (_cfg(mode="local", target_epsilon=0.01), {"batch_size": 64, "local_steps": 50}, "unreachable"),
    (_cfg(mode="client", adaptive_clip=True), {"clients_per_round": 4}, "count noise"),
    (_cfg(mode="client", adaptive_clip=True, target_quantile=0.0), {"clients_per_round": 100}, "target_quantile"),
    (_cfg(mode="client"), {"clients_per_round": 101}, "clients_per_round"),
    (_cfg(mode="local"), {"min_local_examples": 0}, "at least one training example"),
    (_cfg(mode="client"), {"clients_per_round": 1}, "would sample no client"),
    (_cfg(mode="client", client_sampling="fixed", accountant="prv"), {}, "RDP only"),
])
def test_check_privacy_rejects_impossible_settings(cfg: PrivacySection, kw: dict, match: str) -> None:
    with pytest.raises(PrivacyError, match=match):
        check_privacy(cfg, **{**GOOD, **kw})


def test_check_privacy_accepts_sane_settings() -> None:
    check_privacy(_cfg(mode="none", noise_multiplier=0.0, delta=0.5), **GOOD)
    check_privacy(_cfg(mode="both"), **GOOD)
    check_privacy(_cfg(mode="local", target_epsilon=8.0), **GOOD, batch_size=16, local_steps=10)
    check_privacy(_cfg(mode="client", adaptive_clip=True), **{**GOOD, "clients_per_round": 40})
    # few clients per round: a larger count noise (a noisier clip estimate) leaves budget for the update
    check_privacy(_cfg(mode="client", adaptive_clip=True, clip_count_noise=0.6), **{**GOOD, "clients_per_round": 4})
    check_privacy(_cfg(mode="client"), num_clients=4, clients_per_round=0, rounds=3, min_local_examples=1)
