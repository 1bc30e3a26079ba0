"""The empirical epsilon audit runs the server's own client-level DP mechanism and the clients' DP-SGD, and
catches a broken noise scale at either level."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedpeft import cli, config
from fedpeft.audit.epsilon import audit_client_level, audit_local_dpsgd
from fedpeft.errors import ConfigError


def _without_noise(cfg: config.Config, key: str) -> config.Config:
    """``cfg`` with ``privacy.<key> = 0``: a broken mechanism the configuration itself refuses (no privacy), built
    behind its back so that the audit can show it would catch one."""
    return dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, **{key: 0.0}))


def _cfg(z: float, rounds: int = 1, **extra: str) -> config.Config:
    cfg = config.load(None, ["privacy.mode=client", f"privacy.server_noise_multiplier={z or 1.0}",
                             "privacy.clip_norm=1.0", "privacy.delta=1e-5", f"federation.rounds={rounds}",
                             *(f"{k}={v}" for k, v in extra.items())])
    return cfg if z else _without_noise(cfg, "server_noise_multiplier")


def test_without_noise_the_bound_is_far_above_any_small_epsilon() -> None:
    result = audit_client_level(_cfg(0.0), canaries=1000)
    assert result.bound.epsilon_lower_bound > 4.0 and result.bound.correct == result.bound.guesses


@pytest.mark.parametrize("z, claimed", [(4.0, 1.0), (2.2, 2.0), (1.2, 4.0)])
def test_correct_dp_stays_below_its_claim(z: float, claimed: float) -> None:
    result = audit_client_level(_cfg(z), canaries=4096)
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


def test_the_command_writes_each_level_beside_its_claim(tmp_path, capsys) -> None:
    rc = cli.main(["audit", "--epsilon-lower-bound", "--canaries", "200", "--set", "privacy.mode=both",
                   "--set", "privacy.server_noise_multiplier=2", "--set", "privacy.noise_multiplier=2",
                   "--set", f"output.dir={tmp_path}"])
    printed = capsys.readouterr()
    out = json.loads(printed.out.strip().splitlines()[-1])
    assert rc == 0 and out["verdict"] == "pass" and set(out["levels"]) == {"client", "example"}
    # off a terminal (a log file) plain lines say where the work is: no progress bar is drawn there
    assert "canary clients (" in printed.err and "epsilon audit: DP-SGD over 200 canary records (" in printed.err
    assert all(v["epsilon_lower_bound"] < v["claimed_epsilon"] for v in out["levels"].values())
    header, *rows = (tmp_path / next(p.name for p in tmp_path.iterdir()) / "audit.csv").read_text().splitlines()
    assert header.startswith("level,claimed_epsilon,epsilon_lower_bound,verdict") and len(rows) == 2
    assert all(",pass," in row for row in rows)


def _local(z: float) -> config.Config:
    cfg = config.load(None, ["privacy.mode=local", f"privacy.noise_multiplier={z or 1.0}", "privacy.max_grad_norm=1.0",
                             "privacy.delta=1e-5"])
    return cfg if z else _without_noise(cfg, "noise_multiplier")


def test_dpsgd_without_noise_is_far_above_any_small_epsilon() -> None:
    result = audit_local_dpsgd(_local(0.0), canaries=1000)
    assert result.level == "example" and result.bound.epsilon_lower_bound > 4.0


@pytest.mark.parametrize("z", [4.0, 1.2])
def test_correct_dpsgd_stays_below_its_claim(z: float) -> None:
    result = audit_local_dpsgd(_local(z), canaries=4096)
    assert 0 < result.bound.epsilon_lower_bound < result.claimed_epsilon and result.verdict == "pass"


def test_dpsgd_noise_divided_by_four_is_flagged() -> None:
    """The accountant still charges the configured noise; the audit sees the real one."""
    result = audit_local_dpsgd(_local(4.0), canaries=1000, noise_divisor=4.0)
    assert result.claimed_epsilon == pytest.approx(1.0, rel=0.05) and result.verdict == "fail"


def test_dpsgd_over_poisson_batches_and_several_steps_stays_below_its_claim() -> None:
    result = audit_local_dpsgd(_local(1.0), canaries=1000, steps=4, batch_size=100)
    assert result.sample_rate == pytest.approx(100 / 500, rel=0.15) and result.steps == 4
    assert result.bound.epsilon_lower_bound < result.claimed_epsilon


def test_refuses_runs_without_the_dp_it_audits() -> None:
    with pytest.raises(ConfigError, match="client-level DP"):
        audit_client_level(config.load(None, []), canaries=100)
    with pytest.raises(ConfigError, match="local DP-SGD"):
        audit_local_dpsgd(config.load(None, ["privacy.mode=client"]), canaries=100)
