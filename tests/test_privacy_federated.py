"""Client-level DP inside the federated loop: epsilon every round, resume continues the same curve."""

import pytest

from fedpeft import report
from fedpeft.privacy import ClientLevelAccountant
from fedpeft.simulation import runner

DP = {"privacy.mode": "client", "privacy.server_noise_multiplier": 0.5, "privacy.clip_norm": 0.5,
      "privacy.delta": 1e-3, "data.num_clients": 4, "federation.clients_per_round": 2, "federation.rounds": 3}


def test_client_level_dp_run_reports_epsilon_each_round(tiny_cfg):
    rows = report.read_metrics(runner.simulate(tiny_cfg(**DP)))
    eps = [r["epsilon_client"] for r in rows]
    assert all(r["replies"] == 2 for r in rows)
    assert eps == sorted(eps) and eps[0] > 0
    ref = ClientLevelAccountant("rdp")
    for _ in range(3):
        ref.step(0.5, 0.5)
    assert eps[-1] == pytest.approx(ref.epsilon(1e-3))
    assert all(r["clip_norm"] == 0.5 for r in rows)


def test_adaptive_clipping_with_compression_and_resume(tiny_cfg, monkeypatch):
    extra = {**DP, "privacy.adaptive_clip": True, "privacy.server_noise_multiplier": 0.01,
             "federation.clients_per_round": 4, "compression.uplink": "compeft:0.2"}
    keys = ("epsilon_client", "clip_norm", "eval_loss", "train_loss")
    full = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    assert len({r["clip_norm"] for r in full}) == 3  # the clip norm moves every round

    from fedpeft.server import loop
    original = loop.FederatedServer.run_round

    class Stop(Exception):
        pass

    def crash(self, grid, rnd):
        if rnd == 3:
            raise Stop()
        return original(self, grid, rnd)

    monkeypatch.setattr(loop.FederatedServer, "run_round", crash)
    cfg, run_dir = runner.prepare(tiny_cfg(**extra))
    with pytest.raises(Stop):
        runner.execute(cfg, run_dir)
    monkeypatch.setattr(loop.FederatedServer, "run_round", original)
    runner.simulate(resume=run_dir)
    assert [[r[k] for k in keys] for r in report.read_metrics(run_dir)] == [[r[k] for k in keys] for r in full]
