"""The empirical epsilon audit runs the server's own client-level DP mechanism and catches a broken noise scale."""

from __future__ import annotations

import json

import pytest

from fedpeft import cli, config
from fedpeft.audit.epsilon import audit_client_level
from fedpeft.errors import ConfigError


def _cfg(z: float, rounds: int = 1, **extra: str) -> config.Config:
    return config.load(None, ["privacy.mode=client", f"privacy.server_noise_multiplier={z}", "privacy.clip_norm=1.0",
                              "privacy.delta=1e-5", f"federation.rounds={rounds}",
                              *(f"{k}={v}" for k, v in extra.items())])


def test_without_noise_the_bound_is_far_above_any_small_epsilon() -> None:
    result = audit_client_level(_cfg(0.0), canaries=1000)
    assert result.bound.epsilon_lower_bound > 4.0 and result.bound.correct == result.bound.guesses


@pytest.mark.parametrize("z, claimed", [(4.0, 1.0), (2.2, 2.0), (1.2, 4.0)])
def test_correct_dp_stays_below_its_claim(z: float, claimed: float) -> None:
    result = audit_client_level(_cfg(z), canaries=1000)
    assert result.claimed_epsilon == pytest.approx(claimed, rel=0.05)
    assert 0 < result.bound.epsilon_lower_bound < result.claimed_epsilon and result.verdict == "pass"


def test_noise_divided_by_four_is_flagged() -> None:
    result = audit_client_level(_cfg(4.0), canaries=1000, noise_divisor=4.0)
    assert result.bound.epsilon_lower_bound > result.claimed_epsilon and result.verdict == "fail"


def test_poisson_sampling_over_several_rounds_stays_below_its_claim() -> None:
    cfg = _cfg(1.0, rounds=4, **{"federation.clients_per_round": 100, "data.num_clients": 1000})
    result = audit_client_level(cfg, canaries=1000)
    assert result.sample_rate == pytest.approx(100 / 500, rel=0.15)
    assert result.bound.epsilon_lower_bound < result.claimed_epsilon


def test_the_command_writes_the_bound_beside_the_claim(tmp_path, capsys) -> None:
    rc = cli.main(["audit", "--epsilon-lower-bound", "--canaries", "200", "--set", "privacy.mode=client",
                   "--set", "privacy.server_noise_multiplier=2", "--set", f"output.dir={tmp_path}"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["verdict"] == "pass" and out["epsilon_lower_bound"] < out["claimed_epsilon"]
    header, row = (tmp_path / next(p.name for p in tmp_path.iterdir()) / "audit.csv").read_text().splitlines()
    assert header.startswith("claimed_epsilon,epsilon_lower_bound,verdict") and ",pass," in row


def test_refuses_runs_without_client_level_dp() -> None:
    with pytest.raises(ConfigError, match="client-level DP"):
        audit_client_level(config.load(None, []), canaries=100)
