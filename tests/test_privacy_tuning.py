"""DP-friendly defaults: under local DP-SGD, groups of keys the scenario leaves unset take the measured DP values
together; a group any of whose keys the scenario sets is left to the scenario; the suggestion names the setting.
Under client-level and distributed DP the noise hint says how large the noise on each round's mean is against the
clip norm, and target_epsilon sets the server noise multiplier the run's accountant needs."""

from __future__ import annotations

import pytest

from fedpeft import config
from fedpeft.errors import PrivacyError
from fedpeft.privacy.accounting import ClientLevelAccountant
from fedpeft.privacy.tuning import DP_DEFAULTS, NOISE_WARNING, apply_dp_defaults, noise_hint, suggestions

BEST, FALLBACK = (group.values for group in DP_DEFAULTS)
NON_DP = config.load(None, [])


def _shape(cfg: config.Config) -> dict[tuple[str, str], object]:
    return {(s, k): getattr(getattr(cfg, s), k) for s, k in BEST}


@pytest.mark.parametrize("mode", ["local", "both"])
def test_dp_sgd_takes_the_measured_batch_steps_and_rate_when_the_scenario_leaves_them_unset(mode: str) -> None:
    cfg = config.load(None, [f'privacy.mode="{mode}"'])
    assert _shape(cfg) == BEST != _shape(NON_DP)
    assert _shape(config.loads(cfg.to_toml())) == BEST  # the run's config.toml keeps what was used


@pytest.mark.parametrize("own", ["train.batch_size=16", "train.local_steps=15", "train.local_epochs=1.0",
                                 "privacy.physical_batch_size=0"])
def test_a_scenario_that_sets_its_own_batch_or_steps_keeps_them_and_gets_the_fallback_rate(own: str) -> None:
    cfg = config.load(None, ['privacy.mode="local"', own])
    assert cfg.train.lr == FALLBACK[("train", "lr")]
    assert (cfg.train.batch_size, cfg.train.local_steps) == (NON_DP.train.batch_size, NON_DP.train.local_steps)


@pytest.mark.parametrize("sets", [['privacy.mode="local"', f"train.lr={NON_DP.train.lr}"],  # set explicitly: kept
                                  ['privacy.mode="local"', "privacy.dp_defaults=false"],  # switched off
                                  ['privacy.mode="client"'], ['privacy.mode="distributed"',
                                                              'privacy.secure_aggregation="secaggplus"'], []])
def test_other_settings_keep_the_non_dp_training(sets: list[str]) -> None:
    cfg = config.load(None, sets)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.local_steps) == \
        (NON_DP.train.lr, NON_DP.train.batch_size, NON_DP.train.local_steps)


def test_the_raw_scenario_is_not_changed_and_bad_sections_are_left_to_validation() -> None:
    raw = {"privacy": {"mode": "local"}}
    assert apply_dp_defaults(raw)["train"]["lr"] == BEST[("train", "lr")] and raw == {"privacy": {"mode": "local"}}
    with pytest.raises(config.ConfigError, match=r"\[train\] must be a table"):
        config.from_dict({"privacy": {"mode": "local"}, "train": 3})


def test_suggestions_name_the_measured_setting() -> None:
    slow = config.load(None, ['privacy.mode="local"', "train.lr=0.001"])
    (line,) = suggestions(slow)
    assert "train.lr = 0.001" in line and "--set train.batch_size=64" in line and "--set train.lr=0.02" in line
    assert "0.948" in line
    assert suggestions(config.load(None, ['privacy.mode="local"'])) == []
    assert suggestions(config.load(None, [])) == []


DISTRIBUTED = ['privacy.mode="distributed"', 'privacy.secure_aggregation="secaggplus"', "data.num_clients=100",
               "federation.clients_per_round=50", "privacy.secagg_min_survivors=40",
               "privacy.server_noise_multiplier=1.5"]


def test_the_noise_hint_is_the_norm_of_the_noise_the_clients_add_to_the_mean() -> None:
    """The hint's ratio against the real client encoder: 50 clients noise a zero update each (what SecAgg+ sums),
    and the float mean of the sum has the norm the hint predicts (d = 2,000: the norm's own spread is ~1.6 %)."""
    import numpy as np

    from fedpeft import protocol

    cfg = config.load(None, DISTRIBUTED)
    d, m = 2000, 50
    warn, line = noise_hint(cfg, d)
    ratio = float(line.split("expected norm of ")[1].split(" x")[0])
    ddp = protocol.secure_field(cfg.privacy, d, m).ddp
    rng = np.random.default_rng(0)
    total = sum(ddp.encode(np.zeros(d), rng) for _ in range(m))
    measured = float(np.linalg.norm(total * ddp.scale / m)) / cfg.privacy.clip_norm
    assert measured == pytest.approx(ratio, rel=0.05)
    assert warn == (ratio >= NOISE_WARNING) and ratio > 1  # 1.5 x sqrt(50 / 40) x sqrt(2000) / 50 ~ 1.5


def test_the_noise_hint_scales_with_the_summed_elements_and_the_clients_and_names_the_levers() -> None:
    client = config.load(None, ['privacy.mode="client"', "data.num_clients=200", "federation.clients_per_round=40",
                                "privacy.server_noise_multiplier=1.2"])
    warn, line = noise_hint(client, 1600)  # z sqrt(d) / m = 1.2 x 40 / 40
    assert warn and "1.2 x the clip norm" in line and "1600 summed elements" in line
    assert "freeze_a" in line and "clients per round" in line
    quiet, small = noise_hint(client, 16)  # 1.2 x 4 / 40 = 0.12
    assert not quiet and "0.12 x" in small and "freeze_a" not in small
    kept = config.load(None, [*DISTRIBUTED, "privacy.secagg_keep=0.25"])
    assert "500 summed elements" in noise_hint(kept, 2000)[1]  # a shared subspace sums a quarter
    assert noise_hint(config.load(None, ['privacy.mode="local"']), 1600) is None
    assert noise_hint(NON_DP, 1600) is None


def test_a_distributed_run_logs_the_hint_with_its_adapter_size(tiny_cfg, tmp_path, caplog) -> None:
    from fedpeft.server.loop import FederatedServer

    cfg = tiny_cfg(**{"privacy.mode": "distributed", "privacy.secure_aggregation": "secaggplus",
                      "data.num_clients": 4, "privacy.secagg_min_survivors": 3})
    with caplog.at_level("INFO", logger="fedpeft.server.loop"):
        server = FederatedServer(cfg, tmp_path / "run")
    elements = sum(t.numel() for t in server.global_state.values())
    (record,) = [r for r in caplog.records if "noise on each round's mean" in r.getMessage()]
    assert f"{elements} summed elements" in record.getMessage() and record.levelname == "WARNING"


POPULATION = ["data.num_clients=500", "federation.clients_per_round=100", "federation.rounds=3", "privacy.delta=1e-4",
              "privacy.target_epsilon=8"]


@pytest.mark.parametrize("mode, sampling, accountant, rate", [
    ("client", "poisson", "rdp", 0.2), ("client", "fixed", "rdp", 0.2), ("client", "poisson", "prv", 0.2),
    ("distributed", "fixed", "rdp", 1.0)])  # distributed: rate 1, replace-one, as fedpeft.privacy.server_dp charges
def test_target_epsilon_sets_the_server_noise_the_accountant_needs(mode, sampling, accountant, rate) -> None:
    cfg = config.load(None, [*POPULATION, f'privacy.mode="{mode}"', f'privacy.client_sampling="{sampling}"',
                             f'privacy.accountant="{accountant}"', "privacy.server_noise_multiplier=0.3",
                             'privacy.secure_aggregation="secaggplus"' if mode == "distributed" else "run.seed=0"])
    z = cfg.privacy.server_noise_multiplier
    acc = ClientLevelAccountant(accountant if mode == "client" else "rdp", sampling)
    for _ in range(3):
        acc.step(z, rate)
    assert z != 0.3 and 7.92 <= acc.epsilon(1e-4) <= 8.0  # the given 0.3 replaced; at most the target, within 1 %
    assert config.loads(cfg.to_toml()) == cfg  # the run's config.toml derives the same value again


def test_target_epsilon_under_local_dp_sgd_leaves_the_server_noise_and_an_unreachable_one_is_refused() -> None:
    both = config.load(None, [*POPULATION, 'privacy.mode="both"', "privacy.server_noise_multiplier=0.7"])
    assert both.privacy.server_noise_multiplier == 0.7  # under `both` the target is DP-SGD's
    with pytest.raises(PrivacyError, match="target epsilon 1e-06 is unreachable over 3 round"):
        config.load(None, [*POPULATION, 'privacy.mode="client"', "privacy.target_epsilon=1e-6"])


@pytest.mark.parametrize("accountant, clients, per_round, rounds, delta, lowest", [
    ("rdp", 500, 100, 3, 1e-4, 6.0), ("prv", 500, 100, 3, 1e-4, 7.9),
    ("rdp", 1000, 10, 10, 1e-5, 6.0), ("prv", 1000, 10, 10, 1e-5, 7.9)])
def test_client_level_target_epsilon_holds_under_an_outside_accountant(accountant, clients, per_round, rounds,
                                                                      delta, lowest) -> None:
    """Google's dp_accounting (privacy loss distributions, add/remove one client, pessimistic discretization):
    the z derived for target 8 under Poisson client sampling must give at most 8 there. RDP's derivation leaves
    slack (6.7 / 6.3); PRV's is tight (7.99)."""
    import dp_accounting as dpa
    from dp_accounting import pld

    cfg = config.load(None, ['privacy.mode="client"', 'privacy.client_sampling="poisson"',
                             f'privacy.accountant="{accountant}"', f"data.num_clients={clients}",
                             f"federation.clients_per_round={per_round}", f"federation.rounds={rounds}",
                             f"privacy.delta={delta}", "privacy.target_epsilon=8"])
    outside = pld.PLDAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                value_discretization_interval=1e-3)
    gaussian = dpa.GaussianDpEvent(cfg.privacy.server_noise_multiplier)
    outside.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(per_round / clients, gaussian), rounds))
    assert lowest <= outside.get_epsilon(delta) <= 8.0


def test_distributed_target_epsilon_holds_under_the_exact_gaussian_privacy_profile() -> None:
    """An accountant outside opacus and fedpeft: two rounds of the Gaussian mechanism with replace-one sensitivity
    2C and std z C compose to one with mu = 2 sqrt(2) / z, whose exact delta(eps) (Balle & Wang 2018) is
    Phi(-eps / mu + mu / 2) - e^eps Phi(-eps / mu - mu / 2). The derived z must give at most the target there, and
    not far below it (RDP's slack): a z derived for sensitivity C (half as large) would give 18.4."""
    import math
    from statistics import NormalDist

    phi = NormalDist().cdf
    delta = 1 / 500**1.1
    cfg = config.load(None, ['privacy.mode="distributed"', 'privacy.secure_aggregation="secaggplus"',
                             "data.num_clients=500", "federation.clients_per_round=100", "federation.rounds=2",
                             f"privacy.delta={delta}", "privacy.target_epsilon=8"])
    mu = 2 * math.sqrt(2) / cfg.privacy.server_noise_multiplier
    lo, hi = 0.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if phi(-mid / mu + mu / 2) - math.exp(mid) * phi(-mid / mu - mu / 2) > delta else (lo, mid)
    assert 6.5 <= hi <= 8.0  # 7.15 at z = 1.4725
